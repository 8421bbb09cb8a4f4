"""Pure-PyTorch definitions of what walt's fused ops compute.

These are the oracles the kernels are tested against (run them in float64) and the readable
specification of the ops' semantics. They favour clarity over speed. The fast unfused paths a
user would otherwise write (the `torch` backend and the benchmarks' baseline) are in
`walt.ops.unfused`.
"""
import math

import torch

from walt.ops.noise import coefficients


def clamp_window(window, size):
    """The window actually used on an input of spatial-temporal `size` (T, H, W)."""
    return tuple(min(w, s) for w, s in zip(window, size))


def window_attention_reference(q, k, v, window, scale=None, rel_pos_bias=None):
    """3D windowed attention, one window at a time.

    q, k, v: (B, T, H, W, heads, d). The grid is tiled by non-overlapping windows of
    `window` = (wt, wh, ww) clamped to (T, H, W), starting at multiples of the window size;
    windows at the far edge may be partial and then attend only among their valid tokens.
    Each query attends to every key of its own window:
        out[a] = sum_b softmax_b(scale * <q[a], k[b]> + bias[a, b]) v[b]
    with bias[a, b] = rel_pos_bias[head, ta-tb+wt-1, ha-hb+wh-1, wa-wb+ww-1] in window-local
    coordinates, using the requested (unclamped) window so a table fits any input size.
    Returns a tensor shaped like q; softmax is computed in float32 or better.
    """
    B, T, H, W, heads, d = q.shape
    scale = d**-0.5 if scale is None else scale
    wt, wh, ww = clamp_window(window, (T, H, W))
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(q.shape, dtype=compute, device=q.device)
    for t0 in range(0, T, wt):
        for h0 in range(0, H, wh):
            for w0 in range(0, W, ww):
                sl = (slice(None), slice(t0, t0 + wt), slice(h0, h0 + wh), slice(w0, w0 + ww))
                qw, kw, vw = (x[sl].to(compute) for x in (q, k, v))
                n_t, n_h, n_w = qw.shape[1:4]
                n = n_t * n_h * n_w
                qw, kw, vw = (x.reshape(B, n, heads, d) for x in (qw, kw, vw))
                logits = torch.einsum("bqhd,bkhd->bhqk", qw, kw) * scale
                if rel_pos_bias is not None:
                    logits = logits + _bias_for_window(rel_pos_bias, window, (n_t, n_h, n_w)).to(compute)
                attn = logits.softmax(dim=-1)
                ow = torch.einsum("bhqk,bkhd->bqhd", attn, vw)
                out[sl] = ow.reshape(B, n_t, n_h, n_w, heads, d)
    return out.to(q.dtype)


def _bias_for_window(rel_pos_bias, window, extent):
    """(heads, n, n) bias of a window with `extent` = (n_t, n_h, n_w) valid tokens per axis."""
    coords = torch.stack(
        torch.meshgrid(*(torch.arange(e, device=rel_pos_bias.device) for e in extent), indexing="ij"), dim=-1
    ).reshape(-1, 3)
    rel = coords[:, None, :] - coords[None, :, :] + torch.tensor(window, device=rel_pos_bias.device) - 1
    return rel_pos_bias[:, rel[..., 0], rel[..., 1], rel[..., 2]]


def add_noise_reference(x0, t, alphas_cumprod, noise, target="v"):
    """Forward diffusion q(x_t | x0) and the training target, in float64.

    x0: (B, ...), t: (B,) integer timesteps, alphas_cumprod: (num_steps,), noise: like x0.
        x_t = sqrt(ab[t]) * x0 + sqrt(1 - ab[t]) * noise
        v   = sqrt(ab[t]) * noise - sqrt(1 - ab[t]) * x0     (target="v")
        eps = noise                                          (target="eps")
        x0  = x0                                             (target="x0")
    """
    a, s = coefficients(alphas_cumprod.to(torch.float64), t, x0.dim())  # in float64, whatever the table
    x0d, nd = x0.to(torch.float64), noise.to(torch.float64)
    x_t = a * x0d + s * nd
    targets = {"v": lambda: a * nd - s * x0d, "eps": lambda: nd, "x0": lambda: x0d}
    if target not in targets:
        raise ValueError(f"target must be one of 'v', 'eps', 'x0', got {target!r}")
    return x_t, targets[target]()


# --- Philox4x32-10 and Box-Muller: the noise op's generator, written independently of the C++ ---
# Integers are int64 tensors holding uint32 values; every product is assembled from 16-bit halves
# so it never overflows int64. See csrc/include/walt/philox.h for the recipe in words.

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a, b):
    """(hi, lo) 32-bit words of a * b for a Python int a < 2^32 and an int64 tensor b < 2^32."""
    t = a * (b & 0xFFFF)  # < 2^48
    u = a * (b >> 16) + (t >> 16)  # < 2^48 + 2^32
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def philox4x32_reference(counter, key, rounds=10):
    """Philox4x32-R of `counter` (..., 4) under `key` (..., 2): int64 tensors of uint32 words.

    Random123's philox4x32_R: `rounds` rounds, the key bumped by the Weyl constants between them.
    """
    c0, c1, c2, c3 = (counter[..., i] & _MASK32 for i in range(4))
    k0, k1 = key[..., 0] & _MASK32, key[..., 1] & _MASK32
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_uniforms_reference(x):
    """The two uniforms of the Box-Muller map: u1 = ((x >> 8) + 1) 2^-24 in (0, 1] and
    u2 = (x >> 8) 2^-24 in [0, 1), as float64 (both are exact in float32)."""
    top = (x >> 8).to(torch.float64)
    return (top + 1) * 2.0**-24, top * 2.0**-24


def philox_normal_reference(numel, seed, keys):
    """The first `numel` normals of each key's Philox stream, in float64: shape (len(keys), numel).

    Element i of the sample keyed K under seed S comes from block j = i // 4 with counter
    (lo32(j), hi32(j), lo32(K), hi32(K)) and key (lo32(S), hi32(S)); the outputs (x0, x1, x2, x3)
    give r = sqrt(-2 log u1(x_a)), (r cos(2 pi u2(x_b)), r sin(2 pi u2(x_b))) for (a, b) = (0, 1)
    and (2, 3), and element i takes number i % 4. seed is an int in [0, 2^64); keys an int64
    tensor (negative keys are their two's complement).
    """
    keys = torch.as_tensor(keys, dtype=torch.int64).reshape(-1)
    blocks = torch.arange((numel + 3) // 4, dtype=torch.int64)
    j = blocks[None, :].expand(len(keys), -1)
    k = keys[:, None].expand_as(j)
    counter = torch.stack([j & _MASK32, j >> 32, k & _MASK32, (k >> 32) & _MASK32], dim=-1)
    key = torch.tensor([seed & _MASK32, (seed >> 32) & _MASK32], dtype=torch.int64).expand(*j.shape, 2)
    x = philox4x32_reference(counter, key)
    u1, _ = philox_uniforms_reference(x[..., 0::2])
    _, u2 = philox_uniforms_reference(x[..., 1::2])
    r = torch.sqrt(-2 * torch.log(u1))
    angle = 2 * math.pi * u2
    pairs = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=-1)  # (K, blocks, 2, 2)
    return pairs.reshape(len(keys), -1)[:, :numel]
