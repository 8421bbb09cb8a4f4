"""walt.diffusion.schedules against diffusers' DDPMScheduler, and the invariants of ᾱ."""
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

from walt.diffusion import alphas_cumprod, make_betas, make_schedule, rescale_zero_terminal_snr

U32 = 2.0**-24  # float32 unit roundoff: diffusers builds its tables in float32
NAMES = [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")]


@pytest.mark.parametrize("name, diffusers_name", NAMES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_matches_diffusers(name, diffusers_name, zero_snr):
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name, rescale_betas_zero_snr=zero_snr)
    betas = make_betas(name, 1000)
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    ours = alphas_cumprod(betas)
    assert torch.equal(ours, make_schedule(name, 1000, zero_terminal_snr=zero_snr))
    # Un-rescaled betas are a few float32 roundings away. The rescale divides neighbouring float32
    # ᾱ values, which leaves absolute errors of some dozens of u. A cumprod of 1000 float32 factors
    # drifts by up to ~1000 u relative.
    if zero_snr:
        torch.testing.assert_close(betas, theirs.betas.double(), rtol=0, atol=64 * U32)
    else:
        torch.testing.assert_close(betas, theirs.betas.double(), rtol=8 * U32, atol=0)
    torch.testing.assert_close(ours, theirs.alphas_cumprod.double(), rtol=1000 * U32, atol=32 * U32)


@pytest.mark.parametrize("name, _", NAMES)
def test_rescale_is_diffusers_algorithm_in_float64(name, _):
    betas = make_betas(name, 1000)
    theirs = diffusers_rescale(betas.clone())
    torch.testing.assert_close(rescale_zero_terminal_snr(betas), theirs, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name, _", NAMES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_decreases_strictly(name, _, zero_snr):
    ab = make_schedule(name, 1000, zero_terminal_snr=zero_snr)
    assert ab.dtype == torch.float64 and ab.shape == (1000,)
    assert (ab[1:] < ab[:-1]).all()
    assert 0 <= ab.min() and ab.max() < 1


@pytest.mark.parametrize("name, _", NAMES)
def test_zero_terminal_snr(name, _):
    plain = make_schedule(name, 1000, zero_terminal_snr=False)
    rescaled = make_schedule(name, 1000, zero_terminal_snr=True)
    assert rescaled[-1].item() == 0.0 and plain[-1].item() > 0
    torch.testing.assert_close(rescaled[0], plain[0], rtol=1e-15, atol=0)


def test_walt_default_schedule():
    ab = make_schedule()
    betas = make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-18) and betas[-1].item() == pytest.approx(0.02, abs=1e-18)
    assert ab[-1].item() == 0.0 and len(ab) == 1000


def test_bad_arguments_raise():
    expected = "unknown beta schedule 'squaredcos'; expected 'linear', 'scaled_linear' or 'cosine'"
    with pytest.raises(ValueError, match=expected):
        make_betas("squaredcos")
    with pytest.raises(ValueError, match="unknown beta schedule 'Linear'"):
        make_schedule("Linear")
    with pytest.raises(ValueError, match="num_steps must be a positive integer, got 0"):
        make_betas("linear", 0)
