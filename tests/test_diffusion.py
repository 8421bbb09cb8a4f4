"""Noising, the v objective with self-conditioning, and DDIM sampling."""
import pytest
import torch

from walt.diffusion import Diffusion, DiffusionConfig, ddim_sample, ddim_timesteps, make_schedule
from walt.ops.noise import coefficients
from walt.ops.reference import add_noise_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _diffusion(backend="torch", **over):
    return Diffusion(DiffusionConfig(noise_backend=backend, **over))


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_add_noise_matches_the_float64_reference(backend):
    d = _diffusion(backend)
    x0 = torch.randn(4, 3, 4, 4, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    x_t, v = d.add_noise(x0, t, noise=noise)
    ref_x, ref_v = add_noise_reference(x0, t, d.alphas_cumprod, noise, target="v")
    torch.testing.assert_close(x_t, ref_x.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, ref_v.float(), rtol=1e-5, atol=1e-5)
    # zero terminal SNR: the last step is pure noise and v = -x0 there
    torch.testing.assert_close(x_t[3], noise[3], rtol=0, atol=1e-6)
    torch.testing.assert_close(v[3], -x0[3], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_noise_depends_on_seed_and_key_not_on_batch(backend):
    d = _diffusion(backend)
    x0 = torch.zeros(3, 2, 4, 4, 8)
    t = torch.full((3,), 999)  # x_t is the noise itself
    a, _ = d.add_noise(x0, t, seed=7, keys=torch.tensor([5, 6, 7]))
    b, _ = d.add_noise(x0[:1], t[:1], seed=7, keys=torch.tensor([6]))
    c, _ = d.add_noise(x0[:1], t[:1], seed=8, keys=torch.tensor([6]))
    torch.testing.assert_close(a[1:2], b, rtol=0, atol=0)
    assert (b - c).abs().amax() > 0.1
    assert abs(a.std().item() - 1) < 0.1


def test_schedule_and_velocity_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", rescale_betas_zero_snr=True, prediction_type="v_prediction"
    )
    ab = make_schedule()
    torch.testing.assert_close(ab.float(), sched.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
    x0, noise, t = torch.randn(3, 8), torch.randn(3, 8), torch.tensor([3, 400, 998])
    _, v = _diffusion().add_noise(x0, t, noise=noise)
    torch.testing.assert_close(v, sched.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_draws_follow_the_self_conditioning_rate():
    d = _diffusion()
    t, sc = d.draw(seed=3, keys=torch.arange(4000))
    assert 0.88 < sc.float().mean().item() < 0.92
    assert t.min() >= 0 and t.max() <= 999 and 450 < t.float().mean().item() < 550
    t2, sc2 = d.draw(seed=3, keys=torch.arange(10, 20))
    assert torch.equal(t2, t[10:20]) and torch.equal(sc2, sc[10:20])


def test_loss_is_zero_for_the_true_v_and_self_conditions():
    d = _diffusion()
    x0 = torch.randn(8, 2, 3, 3, 8)
    seen = []

    def oracle(x_t, t, self_cond=None, y=None):  # knows x0: v = (a x_t - x0) / s
        seen.append(self_cond.abs().amax(dim=(1, 2, 3, 4)) > 0)
        a, s = d._coeffs(t, x_t)
        return (a * x_t - x0) / s

    loss = d.loss(oracle, x0, seed=0, keys=torch.arange(8))
    assert loss.item() < 1e-8
    _, sc = d.draw(0, torch.arange(8))
    assert len(seen) == 2 and torch.equal(seen[1], sc)  # 2nd pass sees the estimate exactly where flagged
    assert not seen[0].any()


def test_ddim_timesteps():
    steps = ddim_timesteps(1000, 50)
    assert steps[0] == 999 and steps[-1] == 19 and len(steps) == 50
    assert all(a - b == 20 for a, b in zip(steps, steps[1:]))
    with pytest.raises(ValueError, match="sample_steps"):
        ddim_timesteps(1000, 0)


def test_ddim_with_the_true_v_recovers_x0():
    ab = make_schedule()
    x0 = torch.rand(2, 5, 4, 4, 8) * 2 - 1

    def oracle(x_t, t, self_cond=None, y=None):
        a, s = coefficients(ab, t, x_t.dim(), torch.float32)
        return (a * x_t - x0) / s

    out = ddim_sample(oracle, torch.randn_like(x0), ab, sample_steps=50)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


def test_ddim_with_the_exact_denoiser_lands_on_the_data():
    """Data = 4 points; the Bayes-optimal v for that distribution is known in closed form.
    DDIM from fresh noise must end on (one of) the data points."""
    ab = make_schedule()
    g = torch.Generator().manual_seed(0)
    points = torch.randn(4, 16, generator=g)

    def denoiser(x_t, t, self_cond=None, y=None):
        a, s = coefficients(ab, t, x_t.dim(), torch.float32)
        logits = -((x_t[:, None] - a[:, None] * points[None]) ** 2).sum(-1) / (2 * s**2)
        x0 = logits.softmax(-1) @ points  # E[x0 | x_t]
        return (a * x_t - x0) / s

    out = ddim_sample(denoiser, torch.randn(64, 16, generator=g), ab, sample_steps=50, self_cond=False)
    dist = (out[:, None] - points[None]).norm(dim=-1)
    assert dist.amin(dim=1).max() < 1e-3
    assert len(set(dist.argmin(1).tolist())) >= 3  # not collapsed onto one point


def test_ddim_matches_diffusers_step_by_step():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )
    sched.set_timesteps(25)
    assert sched.timesteps.tolist() == ddim_timesteps(1000, 25)

    def model(x, t, self_cond=None, y=None):
        return 0.5 * x + torch.sin(t.float()[:, None] / 100)

    noise = torch.randn(3, 8, dtype=torch.float64)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t.repeat(3)), t, x).prev_sample
    ours = ddim_sample(model, noise.clone(), make_schedule(), sample_steps=25, self_cond=False)
    torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)


def test_samples_are_written_as_mp4_and_png_grid(tmp_path):
    av = pytest.importorskip("av")
    from PIL import Image

    from walt.diffusion.media import write_mp4, write_png_grid

    videos = -torch.ones(3, 5, 3, 16, 24)
    videos[:, :, 0] = 1.0  # red
    write_mp4(str(tmp_path / "s.mp4"), videos, fps=4)
    write_png_grid(str(tmp_path / "s.png"), videos, pad=2)
    with av.open(str(tmp_path / "s.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 72, 3)
    assert frames[2][..., 0].mean() > 200 and frames[2][..., 2].mean() < 60
    grid = Image.open(tmp_path / "s.png")
    assert grid.size == (5 * 26 + 2, 3 * 18 + 2)
    assert grid.getpixel((3, 3)) == (255, 0, 0)
