"""walt.ops.add_noise against the float64 reference, diffusers, the Philox oracle and statistics."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import walt  # noqa: F401  (loads torch.ops.walt)
from walt.diffusion import make_schedule
from walt.ops import add_noise
from walt.ops.reference import add_noise_reference, philox4x32_reference, philox_normal_reference

AC = make_schedule()  # float64, linear betas with the zero-terminal-SNR rescale: AC[-1] == 0
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
DTYPES = list(UNIT_ROUNDOFF)
TARGETS = ["v", "eps", "x0"]


def generated_eps(shape, seed=0, keys=None):
    """The op's own float32 noise for a batch of `shape` (target 'eps' returns eps itself)."""
    x0 = torch.zeros(shape, dtype=torch.float32)
    return add_noise(x0, torch.zeros(shape[0], dtype=torch.long), AC, seed=seed, keys=keys, target="eps")[1]


def assert_close_to_reference(out, ref, bound, dtype):
    """|out - ref| <= 4 u bound: a few roundings of the coefficients, each product, the sum and the cast."""
    err = (out.to(torch.float64) - ref).abs()
    tol = 4 * UNIT_ROUNDOFF[dtype] * bound + 1e-300
    worst = (err / tol).max().item() if err.numel() else 0.0
    assert worst <= 1, f"error {worst:.2f}x the tolerance"


def compute_table(dtype):
    """The op casts the table to x0's compute dtype first, as diffusers does: near t = 0,
    1 - ab[t] (~1e-4) keeps only about half of its float32 digits after that cast, so the
    reference starts from the cast table too."""
    return AC if dtype == torch.float64 else AC.float()


def error_bound(x0, t, noise):
    """(a + s)(|x0| + |eps|): covers the products of x_t = a x0 + s eps and of v = a eps - s x0."""
    ab = AC[t].reshape(-1, *([1] * (x0.dim() - 1)))
    return (ab.sqrt() + (1 - ab).sqrt()) * (x0.double().abs() + noise.double().abs())


# --- against the float64 reference -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", [(0, 3, 4), (1, 5), (3, 4, 5, 7), (2, 4099)])
def test_generated_noise_matches_reference(dtype, target, shape):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=g).to(dtype)
    t = torch.randint(0, len(AC), (shape[0],), generator=g)
    t[:2] = torch.tensor([0, len(AC) - 1])[: shape[0]]  # the ends of the table
    x_t, tgt = add_noise(x0, t, AC, seed=7, target=target)
    assert x_t.dtype == tgt.dtype == dtype and x_t.shape == tgt.shape == x0.shape
    eps = generated_eps(shape, seed=7)  # the stream is the same for every dtype
    ref_xt, ref_tgt = add_noise_reference(x0, t, compute_table(dtype), eps, target)
    bound = error_bound(x0, t, eps)
    assert_close_to_reference(x_t, ref_xt, bound, dtype)
    assert_close_to_reference(tgt, ref_tgt, bound, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", TARGETS)
def test_explicit_noise_matches_reference(dtype, target):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 3, 33, generator=g).to(dtype)
    noise = torch.randn(4, 3, 33, generator=g).to(dtype)
    t = torch.tensor([0, 1, 500, 999])
    x_t, tgt = add_noise(x0, t, AC, noise=noise, target=target)
    ref_xt, ref_tgt = add_noise_reference(x0, t, compute_table(dtype), noise, target)
    bound = error_bound(x0, t, noise)
    assert_close_to_reference(x_t, ref_xt, bound, dtype)
    assert_close_to_reference(tgt, ref_tgt, bound, dtype)
    if target != "v":  # eps and x0 pass through untouched
        assert torch.equal(tgt, noise if target == "eps" else x0)


def test_non_contiguous_x0_gives_contiguous_outputs_equal_to_the_contiguous_input():
    base = torch.randn(6, 5, 8, 3)
    x0 = base.permute(3, 1, 0, 2)[:, :, ::2]  # (3, 5, 3, 8), strided in every dimension
    assert not x0.is_contiguous()
    t = torch.tensor([10, 400, 999])
    for kwargs in ({}, {"noise": torch.randn(8, 3, 5, 6).permute(1, 2, 3, 0)[:, :, ::2]}):
        kwargs_c = {k: v.contiguous() for k, v in kwargs.items()}
        got = add_noise(x0, t, AC, seed=3, **kwargs)
        want = add_noise(x0.contiguous(), t, AC, seed=3, **kwargs_c)
        for a, b in zip(got, want):
            assert a.is_contiguous() and torch.equal(a, b)


# --- against diffusers ---------------------------------------------------------------------------


def test_bitwise_parity_with_diffusers_in_float32():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", rescale_betas_zero_snr=True)
    ac = scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(37, 4, 5, 6, 7, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (37,), generator=g)
    t[:3] = torch.tensor([0, 1, 999])
    x_t, v = add_noise(x0, t, ac, noise=noise)
    assert torch.equal(x_t, scheduler.add_noise(x0, noise, t))
    assert torch.equal(v, scheduler.get_velocity(x0, noise, t))
    # every timestep of the table, one sample each
    t = torch.arange(1000)
    x0, noise = torch.randn(1000, 33, generator=g), torch.randn(1000, 33, generator=g)
    x_t, v = add_noise(x0, t, ac, noise=noise)
    assert torch.equal(x_t, scheduler.add_noise(x0, noise, t))
    assert torch.equal(v, scheduler.get_velocity(x0, noise, t))


def test_zero_terminal_snr_step_is_pure_noise():
    assert AC[-1].item() == 0.0
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 2, 50, generator=g)
    t = torch.full((3,), len(AC) - 1)
    x_t, v = add_noise(x0, t, AC, seed=11)
    eps = generated_eps(x0.shape, seed=11)
    assert torch.equal(x_t, eps) and torch.equal(v, -x0)
    noise = torch.randn(x0.shape, generator=g)
    x_t, v = add_noise(x0, t, AC, noise=noise)
    assert torch.equal(x_t, noise) and torch.equal(v, -x0)


# --- the generator -------------------------------------------------------------------------------


def test_reference_philox_reproduces_random123_known_answers():
    counters = torch.tensor([[0] * 4, [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]])
    keys = torch.tensor([[0, 0], [0xFFFFFFFF, 0xFFFFFFFF], [0xA4093822, 0x299F31D0]])
    expected = [
        [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
        [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ]
    assert philox4x32_reference(counters, keys).tolist() == expected


@pytest.mark.parametrize("seed", [0, 123456789, 2**63 + 12345, 2**64 - 1])
def test_philox_stream_matches_oracle(seed):
    keys = torch.tensor([0, 1, -5, 2**40 + 3])
    n = 50001  # not a multiple of 4 or of the kernel's chunk
    eps = generated_eps((4, n), seed=seed, keys=keys).double()
    ref = philox_normal_reference(n, seed, keys)
    # a few float32 ulps: the float log/sincos approximations against float64 libm
    ulp = torch.from_numpy(np.spacing(ref.abs().float().numpy())).double()
    assert ((eps - ref).abs() <= 4 * ulp + 2.0**-24).all()


def test_noise_statistics():
    B, n = 16, 65536  # 2^20 samples
    eps = generated_eps((B, n), seed=2024).double()
    z, N = eps.flatten(), eps.numel()
    assert z.abs().max() <= math.sqrt(48 * math.log(2)) + 1e-6  # largest Box-Muller radius here
    # moments, each within 5 standard errors of its N(0, 1) value
    assert abs(z.mean()) < 5 / math.sqrt(N)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / N)
    assert abs((z**3).mean()) < 5 * math.sqrt(15 / N)
    assert abs((z**4).mean() - 3) < 5 * math.sqrt(96 / N)
    # two-sided tail fractions beyond 1, 2, 3 sigma (binomial standard errors)
    for k in (1, 2, 3):
        p = math.erfc(k / math.sqrt(2))
        assert abs((z.abs() > k).double().mean() - p) < 5 * math.sqrt(p * (1 - p) / N)
    # no correlation between elements 1..4 apart within a sample (the lags inside and across
    # Philox blocks and Box-Muller pairs), nor between samples with neighbouring keys
    for lag in (1, 2, 3, 4):
        r = (eps[:, lag:] * eps[:, :-lag]).mean()
        assert abs(r) < 5 / math.sqrt(B * (n - lag))
    r = (eps[1:] * eps[:-1]).mean()
    assert abs(r) < 5 / math.sqrt((B - 1) * n)


def test_same_seed_and_key_give_the_same_noise_in_any_batch():
    n = 5003
    batch = generated_eps((5, n), seed=9)  # default keys 0..4
    alone = generated_eps((1, n), seed=9, keys=torch.tensor([3]))
    assert torch.equal(batch[3], alone[0])
    shuffled = generated_eps((3, n), seed=9, keys=torch.tensor([4, 0, 2]))
    assert torch.equal(shuffled, batch[[4, 0, 2]])
    # a sample's stream does not depend on its shape, only on its flat element index
    assert torch.equal(generated_eps((1, 7, n), seed=9).flatten()[:n], generated_eps((1, n), seed=9)[0])


def test_noise_is_bitwise_identical_across_thread_counts():
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(8, 8, 5, 32, 32, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    try:
        torch.set_num_threads(1)
        one = add_noise(x0, t, AC, seed=1)
        torch.set_num_threads(max(2, threads))
        many = add_noise(x0, t, AC, seed=1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_are_bitwise_identical_across_vector_isas(monkeypatch, dtype):
    # WALT_CPU_ISA caps the vector loops; on a CPU without AVX-512 or AVX2 the cap changes nothing.
    # The scalar build cannot contract into FMAs on x86-64, so equality also shows the vector
    # builds round a*x0 + s*eps like it does.
    g = torch.Generator().manual_seed(12)
    x0 = torch.randn(3, 4099, generator=g).to(dtype)
    noise = torch.randn(3, 4099, generator=g).to(dtype)
    t = torch.tensor([5, 500, 995])
    keys = torch.tensor([7, -7, 2**62])
    results = {}
    for isa in ("baseline", "avx2", "avx512"):
        monkeypatch.setenv("WALT_CPU_ISA", isa)
        results[isa] = add_noise(x0, t, AC, seed=2**40 + 1, keys=keys) + add_noise(x0, t, AC, noise=noise)
    for isa in ("avx2", "avx512"):
        assert all(torch.equal(a, b) for a, b in zip(results[isa], results["baseline"])), isa


def test_unknown_isa_cap_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WALT_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="WALT_CPU_ISA must be one of 'baseline', 'avx2' or 'avx512', got 'sse9'"):
        add_noise(torch.zeros(1, 4), torch.tensor([0]), AC)


def test_different_seeds_and_keys_give_different_noise():
    n = 4096
    a = generated_eps((2, n), seed=1)
    b = generated_eps((2, n), seed=2)
    c = generated_eps((2, n), seed=2**32 + 1)  # differs from seed 1 only in the high word
    for x, y in ((a[0], b[0]), (a[0], a[1]), (a[0], c[0])):
        assert (x != y).float().mean() > 0.999
        assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1]) < 5 / math.sqrt(n)


# --- autograd, opcheck, torch.compile --------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_gradcheck(target):
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(3, 2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    noise = torch.randn(3, 2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([0, 300, 999])
    assert torch.autograd.gradcheck(lambda x, e: add_noise(x, t, AC, noise=e, target=target), (x0, noise))
    assert torch.autograd.gradgradcheck(lambda x, e: add_noise(x, t, AC, noise=e, target=target), (x0, noise))
    assert torch.autograd.gradcheck(lambda x: add_noise(x, t, AC, seed=4, target=target), (x0,))


def test_gradients_in_low_precision_have_x0s_dtype():
    x0 = torch.randn(2, 16, dtype=torch.bfloat16, requires_grad=True)
    x_t, v = add_noise(x0, torch.tensor([100, 900]), AC)
    (x_t.float().sum() + v.float().sum()).backward()
    ab = AC[torch.tensor([100, 900])].float()[:, None]
    assert x0.grad.dtype == torch.bfloat16
    assert torch.equal(x0.grad, (ab.sqrt() - (1 - ab).sqrt()).expand(2, 16).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(3, 4, 5, dtype=dtype, generator=g, requires_grad=True)
    noise = torch.randn(3, 4, 5, dtype=dtype, generator=g, requires_grad=True)
    t = torch.tensor([1, 2, 999])
    op = torch.ops.walt.add_noise.default
    torch.library.opcheck(op, (x0, t, AC, 5, None, None, "v"))
    torch.library.opcheck(op, (x0, t, AC, -3, torch.tensor([9, 8, 7]), None, "x0"))
    torch.library.opcheck(op, (x0, t, AC.float(), 0, None, noise, "eps"))


def test_torch_compile_fullgraph_matches_eager():
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(4, 3, 16, generator=g, requires_grad=True)
    t = torch.tensor([0, 10, 500, 999])
    keys = torch.tensor([100, 101, 102, 103])

    def loss_fn(x):
        x_t, v = add_noise(x, t, AC, seed=42, keys=keys)
        return ((x_t - v) ** 2).mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_loss = loss_fn(x0)
    (eager_grad,) = torch.autograd.grad(eager_loss, x0)
    compiled_loss = compiled(x0)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, x0)
    assert torch.equal(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-6, atol=1e-7)


# --- bad inputs ---------------------------------------------------------------------------------------


def _call(**over):
    args = dict(x0=torch.zeros(2, 3), t=torch.tensor([0, 1]), alphas_cumprod=AC)
    args.update(over)
    return add_noise(args.pop("x0"), args.pop("t"), args.pop("alphas_cumprod"), **args)


@pytest.mark.parametrize(
    "over, error, message",
    [
        (dict(t=torch.tensor([[0, 1]])), ValueError, r"t must have shape \(B,\) = \(2,\).*got shape \[1, 2\]"),
        (dict(t=torch.tensor([0, 1, 2])), ValueError, r"t must have shape \(B,\) = \(2,\).*got shape \[3\]"),
        (dict(t=torch.tensor([0.0, 1.0])), TypeError, "t must be an integer tensor"),
        (dict(x0=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "x0 must be float64, float32, bfloat16 or float16"),
        (dict(x0=torch.zeros(())), ValueError, "x0 must have a leading batch dimension"),
        (dict(noise=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "noise must have x0's dtype Float, got Double"),
        (dict(noise=torch.zeros(2, 4)), ValueError, r"noise must have x0's shape \[2, 3\], got \[2, 4\]"),
        (dict(target="velocity"), ValueError, "target must be 'v', 'eps' or 'x0', got 'velocity'"),
        (dict(alphas_cumprod=AC[None]), ValueError, r"must be a non-empty 1-D tensor .*, got shape \[1, 1000\]"),
        (dict(alphas_cumprod=AC[:0]), ValueError, r"alphas_cumprod must be a non-empty 1-D tensor .*, got shape \[0\]"),
        (dict(alphas_cumprod=AC.long()), TypeError, "alphas_cumprod must be a floating-point tensor, got Long"),
        (dict(keys=torch.tensor([1, 2, 3])), ValueError, r"keys must have shape \(B,\) = \(2,\).*got shape \[3\]"),
        (dict(keys=torch.tensor([1.0, 2.0])), TypeError, "keys must be an integer tensor, got Float"),
        (dict(t=torch.tensor([0, 1], device="meta")), ValueError, "t must be on x0's device cpu, got meta"),
        # What only the Python face checks: Python types, the seed's range, a schedule that requires grad.
        (dict(t=[0, 1]), TypeError, "t must be a torch.Tensor, got list"),
        (dict(noise=0.5), TypeError, "noise must be a torch.Tensor or None, got float"),
        (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*64\), got -1"),
        (dict(seed=2**64), ValueError, r"seed must be an int in \[0, 2\*\*64\)"),
        (dict(alphas_cumprod=AC.clone().requires_grad_()), ValueError, "alphas_cumprod must not require grad"),
    ],
)
def test_bad_inputs_raise_one_clear_sentence(over, error, message):
    with pytest.raises(error, match=message):
        _call(**over)


def test_keys_of_any_integer_dtype_are_their_int64_values():
    x0 = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 500, 900])
    for keys in (torch.tensor([7, 2**31 - 1, 12], dtype=torch.int32), torch.tensor([7, 200, 12], dtype=torch.uint8)):
        want = add_noise(x0, t, AC, seed=3, keys=keys.long())
        got = add_noise(x0, t, AC, seed=3, keys=keys)  # converted by the op (csrc/noise/checks.cpp)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("t, shown", [([0, 1000], r"\[0, 1000\]"), ([-1, 3], r"\[-1, 3\]")])
def test_t_out_of_range(t, shown):
    expected = r"every t must index alphas_cumprod, i.e. lie in \[0, 1000\), got values in " + shown
    with pytest.raises(ValueError, match=expected):
        _call(t=torch.tensor(t))


X, T2 = torch.zeros(2, 3), torch.tensor([0, 1])


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((X, torch.tensor([0]), AC, 0, None, None, "v"), ValueError, r"t must have shape \(B,\) = \(2,\)"),
        ((X, T2, AC[None], 0, None, None, "v"), ValueError, "alphas_cumprod must be a non-empty 1-D tensor"),
        ((X, T2, AC, 0, T2.float(), None, "v"), TypeError, "keys must be an integer tensor"),
        ((X, T2, AC, 0, None, X.half(), "v"), TypeError, r"noise must have x0's dtype Float, got Half"),
        ((X, T2, AC, 0, None, None, "score"), ValueError, "target must be 'v', 'eps' or 'x0', got 'score'"),
        ((torch.zeros(()), torch.tensor([0]), AC, 0, None, None, "v"), ValueError, "x0 must have a leading batch dimension"),
    ],
)
def test_the_op_itself_checks_its_arguments(args, error, message):
    # the same mistakes reaching torch.ops.walt.add_noise directly, past the Python face
    with pytest.raises(error, match=message):
        torch.ops.walt.add_noise(*args)


@pytest.mark.parametrize("bad, shown", [(1.5, r"values in \[.*, 1.5\]"), (-0.25, r"values in \[-0.25, .*\]"), (float("nan"), "NaN")])
def test_alphas_cumprod_outside_zero_one_is_refused(bad, shown):
    table = AC.clone()
    table[500] = bad  # even a timestep that is not drawn: the table itself is wrong
    message = r"alphas_cumprod must lie in \[0, 1\] \(a cumulative product of 1 - beta\), got " + shown
    with pytest.raises(ValueError, match=message):
        _call(alphas_cumprod=table)
    with pytest.raises(ValueError, match=message):
        torch.ops.walt.add_noise(X, T2, table, 0, None, None, "v")
