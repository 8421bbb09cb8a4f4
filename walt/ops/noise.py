"""Diffusion noise injection: x_t and the training target in one pass (torch.ops.walt.add_noise).

    x_t = sqrt(ab[t_b]) * x0 + sqrt(1 - ab[t_b]) * eps
    v   = sqrt(ab[t_b]) * eps - sqrt(1 - ab[t_b]) * x0      (target="v", the default)
    eps                                                     (target="eps")
    x0                                                      (target="x0")

a = sqrt(ab[t_b]) and s = sqrt(1 - ab[t_b]) are computed in x0's compute dtype (float32 for
float32/bfloat16/float16 inputs, float64 for float64) from the table cast to it, with torch's own
`** 0.5` as diffusers does, and each product is rounded before the sum: with an explicit float32
`noise` the results are bitwise equal to diffusers' DDPMScheduler.add_noise and get_velocity.
bfloat16/float16 inputs are computed in float32 and rounded once. Outputs have x0's dtype and are
contiguous.

Without `noise`, eps is drawn from a counter-based generator, so a sample's noise depends only on
(seed, its key, element index), never on batch composition, thread count, device or rank:

    Philox4x32-10 (Salmon et al. 2011; multipliers 0xD2511F53, 0xCD9E8D57, Weyl key increments
    0x9E3779B9, 0xBB67AE85). For element i (row-major flat index within the sample, independent
    of strides) of the sample with 64-bit key K under the 64-bit seed S, block j = i // 4:
        counter = (lo32(j), hi32(j), lo32(K), hi32(K)),  key = (lo32(S), hi32(S))
        (x0, x1, x2, x3) = Philox4x32-10(counter, key)
    Box-Muller on (x0, x1) and (x2, x3) with the top 24 bits of each word:
        u1 = ((x_a >> 8) + 1) * 2^-24 in (0, 1],  u2 = (x_b >> 8) * 2^-24 in [0, 1)
        r = sqrt(-2 log u1),  (r cos(2 pi u2), r sin(2 pi u2))
    and element i takes normal number i % 4. log, sin and cos are float32 approximations from
    csrc/include/walt/philox.h, the header the CPU and CUDA kernels share (each normal is within
    4 float32 ulps + 2^-24 of the exact value); walt.ops.reference.philox_normal_reference is the
    float64 oracle. eps is the same float32 stream for every x0 dtype.

Keys default to the sample's position in the batch (0..B-1); pass stable clip ids to give a clip
the same noise in any batch or on any rank. On CPU the generator runs as AVX-512, AVX2 or scalar
code, whichever the machine offers, with bitwise-equal results; WALT_CPU_ISA=baseline|avx2|avx512
caps the choice (for comparisons and debugging).
"""
import torch

from walt.ops._fake import check_devices

__all__ = ["add_noise"]


def add_noise(x0, t, alphas_cumprod, *, seed=0, keys=None, noise=None, target="v"):
    """Noise x0 to timesteps t and return (x_t, target); see the module docstring.

    x0: (B, ...) float64/float32/bfloat16/float16, any strides. t: (B,) integer timesteps indexing
    alphas_cumprod (1-D float table). seed: int in [0, 2**64). keys: optional (B,) integer tensor of
    per-sample noise keys (default arange(B)). noise: optional explicit eps shaped and typed like x0
    (seed and keys are then unused). target: 'v', 'eps' or 'x0'.
    Differentiable with respect to x0 and an explicit noise tensor.

    The op checks the tensors and the target itself (csrc/noise/checks.cpp), one sentence per
    mistake; here only what it cannot: the arguments' Python types, the seed's range (the op takes
    an int64) and a schedule that requires grad (no gradient flows to it).
    """
    for name, x, optional in (("x0", x0, False), ("t", t, False), ("alphas_cumprod", alphas_cumprod, False),
                              ("keys", keys, True), ("noise", noise, True)):
        if not (isinstance(x, torch.Tensor) or (optional and x is None)):
            kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
            raise TypeError(f"add_noise: {name} must be {kind}, got {type(x).__name__}.")
    if not isinstance(target, str):
        raise TypeError(f"add_noise: target must be 'v', 'eps' or 'x0', got {type(target).__name__}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"add_noise: seed must be an int in [0, 2**64), got {seed!r}.")
    if alphas_cumprod.requires_grad:
        raise ValueError("add_noise: alphas_cumprod must not require grad; no gradient flows to the schedule.")
    # The op's int is a signed int64; seeds >= 2**63 travel as their two's complement.
    seed64 = seed - 2**64 if seed >= 2**63 else seed
    return torch.ops.walt.add_noise(x0, t, alphas_cumprod, seed64, keys, noise, target)


def coefficients(alphas_cumprod, t, ndim=1, dtype=None):
    """a = sqrt(ab[t]) and s = sqrt(1 - ab[t]), shaped (B, 1, ...) to broadcast over ndim-d tensors.

    The one place walt computes them (the op's backward, the torch noise path, the sampler and the
    float64 oracle): in the dtype of the table passed, so the caller chooses the precision, then
    cast to `dtype` if given. `** 0.5` is torch's, as the forward and diffusers use (torch runs it
    as a correctly rounded sqrt).
    """
    ab = alphas_cumprod[t.long()].reshape(-1, *([1] * (ndim - 1)))
    a, s = ab**0.5, (1 - ab) ** 0.5
    return (a, s) if dtype is None else (a.to(dtype), s.to(dtype))


@torch.library.register_fake("walt::add_noise")
def _(x0, t, alphas_cumprod, seed, keys, noise, target):
    check_devices("add_noise", "x0", x0, t=t, alphas_cumprod=alphas_cumprod, keys=keys, noise=noise)
    return x0.new_empty(x0.shape), x0.new_empty(x0.shape)


def _setup_context(ctx, inputs, output):
    x0, t, alphas_cumprod, _seed, _keys, _noise, target = inputs
    ctx.save_for_backward(t, alphas_cumprod)
    ctx.target, ctx.dtype, ctx.ndim = target, x0.dtype, x0.dim()


def _backward(ctx, grad_xt, grad_target):
    """x_t = a x0 + s eps and the target (v = a eps - s x0, eps or x0), differentiated."""
    t, alphas_cumprod = ctx.saved_tensors
    compute = torch.float64 if ctx.dtype == torch.float64 else torch.float32  # the forward's coefficients
    a, s = coefficients(alphas_cumprod.to(compute), t, ctx.ndim)
    g_xt, g_tg = grad_xt.to(a.dtype), grad_target.to(a.dtype)
    if ctx.target == "v":
        grad_x0, grad_noise = a * g_xt - s * g_tg, s * g_xt + a * g_tg
    elif ctx.target == "eps":
        grad_x0, grad_noise = a * g_xt, s * g_xt + g_tg
    else:
        grad_x0, grad_noise = a * g_xt + g_tg, s * g_xt
    grad_x0 = grad_x0.to(ctx.dtype) if ctx.needs_input_grad[0] else None
    grad_noise = grad_noise.to(ctx.dtype) if ctx.needs_input_grad[5] else None
    return grad_x0, None, None, None, None, grad_noise, None


torch.library.register_autograd("walt::add_noise", _backward, setup_context=_setup_context)
