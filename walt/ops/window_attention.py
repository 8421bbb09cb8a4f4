"""3D windowed attention: `torch.ops.walt.window_attention` with autograd and fake kernels.

Semantics are those of `walt.ops.reference.window_attention_reference`; see that docstring.
The kernel reads q, k, v in place (any strides, unit stride on d), so views of one fused qkv
projection need no copy.
"""
import operator
import os

import torch

__all__ = ["window_attention"]

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# The CPU kernel keeps a window's whole n x n logit block per thread (csrc/window_attention/op.cpp).
MAX_WINDOW_TOKENS = 2048


def _keep_probs_budget(value):
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(f"WALT_ATTENTION_KEEP_PROBS_MB must be a number of MiB >= 0 (0: always recompute), got {value!r}.")
    return int(mb * 2**20)


# When gradients are needed on the CPU, the forward keeps the softmax probabilities for the
# backward if they take at most this much memory per call (WALT_ATTENTION_KEEP_PROBS_MB, default
# 1024; 0 always recomputes them, flash-attention style).
KEEP_PROBS_MAX_BYTES = _keep_probs_budget(os.environ.get("WALT_ATTENTION_KEEP_PROBS_MB", "1024"))


def window_attention(q, k, v, window, *, scale=None, rel_pos_bias=None):
    """Attention within non-overlapping 3D windows.

    q, k, v: (B, T, H, W, heads, d), same shape, dtype and device, unit stride on d.
    window: (wt, wh, ww), each >= 1; clamped to (T, H, W); partial windows at the far edge attend
    among their valid tokens only. scale: logit scale, default d**-0.5. rel_pos_bias: optional
    table (heads, 2wt-1, 2wh-1, 2ww-1) for the requested window, q's dtype or float32; it gets a
    gradient when it requires one. Returns a contiguous tensor shaped like q.

    Devices and dtypes: on the CPU every dtype runs on the fused kernel. On CUDA, float16 and
    bfloat16 run on the tensor-core kernels (d of 32, 64, 96 or 128); float32 and float64 run on a
    documented fallback, a composite of ATen ops (gather, cuBLAS batched GEMMs, logsumexp) in the
    input's precision, for any d. It does not use TF32 unless torch's float32 matmul precision
    allows it (torch.backends.cuda.matmul.allow_tf32, off by default), and it holds the windows'
    logits, O(B * heads * windows * n^2) memory for n tokens per window.

    Memory for the backward: q, k, v, the output and one float per query and head (logsumexp).
    On the CPU, when a gradient is needed, the forward also keeps the softmax probabilities
    (B * windows * heads * n^2 floats, about n / d times the size of q) if they fit in
    KEEP_PROBS_MAX_BYTES, and the backward then skips recomputing them: one GEMM of its five. On a
    CPU that GEMM costs more than the memory; GPUs recompute.
    """
    window = _check(q, k, v, window, scale, rel_pos_bias)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if _keep_probs(q, k, v, window, rel_pos_bias):
        out, _, _ = torch.ops.walt.window_attention_keep_probs(q, k, v, window, float(scale), rel_pos_bias)
    else:
        out, _ = torch.ops.walt.window_attention(q, k, v, window, float(scale), rel_pos_bias)
    return out


def _windows_and_tokens(shape, window):
    """(number of windows, tokens of a full window) of a (B, T, H, W, ...) input."""
    windows, tokens = 1, 1
    for w, size in zip(window, shape[1:4]):
        w = min(w, size)  # 0 on an empty axis: no windows, no tokens
        windows *= -(-size // w) if w else 0
        tokens *= w
    return windows, tokens


def _keep_probs(q, k, v, window, rel_pos_bias):
    if q.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    leaves = (q, k, v) if rel_pos_bias is None else (q, k, v, rel_pos_bias)
    if not any(x.requires_grad for x in leaves):
        return False
    windows, tokens = _windows_and_tokens(q.shape, window)
    itemsize = _lse_dtype(q).itemsize  # the probabilities are kept in the accumulation type, like lse
    return q.shape[0] * windows * q.shape[4] * tokens**2 * itemsize <= KEEP_PROBS_MAX_BYTES


def _check(q, k, v, window, scale, rel_pos_bias):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"window_attention: {name} must be a torch.Tensor, got {type(x).__name__}.")
    if q.dim() != 6:
        raise ValueError(f"window_attention: q must be a 6-D tensor (B, T, H, W, heads, d), got {q.dim()} dimensions.")
    if q.dtype not in _DTYPES:
        raise TypeError(f"window_attention: q must be float64, float32, bfloat16 or float16, got {q.dtype}.")
    if q.shape[-1] < 1:
        raise ValueError("window_attention: the head size d (q's last dimension) must be at least 1, got 0.")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"window_attention: {name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}.")
        if x.dtype != q.dtype:
            raise TypeError(f"window_attention: {name} must have q's dtype {q.dtype}, got {x.dtype}.")
        if x.device != q.device:
            raise ValueError(f"window_attention: {name} must be on q's device {q.device}, got {x.device}.")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1 and x.shape[-1] != 1:
            raise ValueError(
                f"window_attention: {name} must have unit stride on its last dimension (d), got stride {x.stride(-1)}."
            )
    window = _window_entries(window)
    _, tokens = _windows_and_tokens(q.shape, window)
    if tokens > MAX_WINDOW_TOKENS:
        raise ValueError(
            f"window_attention: a window may hold at most {MAX_WINDOW_TOKENS} tokens on CPU, got {tokens} "
            f"(window {tuple(window)} on a {tuple(q.shape[1:4])} grid)."
        )
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"window_attention: scale must be a number or None, got {type(scale).__name__}.")
    if rel_pos_bias is not None:
        want = (q.shape[4], 2 * window[0] - 1, 2 * window[1] - 1, 2 * window[2] - 1)
        if not isinstance(rel_pos_bias, torch.Tensor):
            raise TypeError(f"window_attention: rel_pos_bias must be a torch.Tensor or None, got {type(rel_pos_bias).__name__}.")
        if tuple(rel_pos_bias.shape) != want:
            raise ValueError(
                f"window_attention: rel_pos_bias must have shape {want} (heads, 2*wt-1, 2*wh-1, 2*ww-1 for the "
                f"requested window), got {tuple(rel_pos_bias.shape)}."
            )
        if rel_pos_bias.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"window_attention: rel_pos_bias must have q's dtype or float32, got {rel_pos_bias.dtype}.")
        if rel_pos_bias.device != q.device:
            raise ValueError(f"window_attention: rel_pos_bias must be on q's device {q.device}, got {rel_pos_bias.device}.")
    return window


# Window entries beyond the grid are clamped, so any size is meaningful; the op bounds them so that
# the bias table's 2w-1 and the token counts stay far from int64 overflow.
MAX_WINDOW_ENTRY = 2**31 - 1


def _window_entries(window):
    """window as a list of 3 ints in [1, MAX_WINDOW_ENTRY]; floats and bools are refused, not truncated."""
    try:
        entries = list(window)
    except TypeError:
        entries = None
    if entries is None or not all(_is_integer(w) for w in entries):
        raise TypeError(f"window_attention: window must be a sequence of 3 integers (wt, wh, ww), got {window!r}.")
    entries = [operator.index(w) for w in entries]
    if len(entries) != 3:
        raise ValueError(f"window_attention: window must have 3 entries (wt, wh, ww), got {len(entries)}.")
    if min(entries) < 1:
        raise ValueError(f"window_attention: every window entry must be at least 1, got {tuple(entries)}.")
    if max(entries) > MAX_WINDOW_ENTRY:
        raise ValueError(
            f"window_attention: every window entry must be at most {MAX_WINDOW_ENTRY} (2**31 - 1), got {tuple(entries)}."
        )
    return entries


def _is_integer(w):
    if isinstance(w, bool):
        return False
    if isinstance(w, torch.Tensor):
        return w.dim() == 0 and not w.dtype.is_floating_point and not w.dtype.is_complex and w.dtype != torch.bool
    try:
        operator.index(w)
    except TypeError:
        return False
    return True


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, window, scale, rel_pos_bias):
    return q.new_empty(q.shape), q.new_empty(q.shape[:5], dtype=_lse_dtype(q))


def _fake_backward(grad_out, q, k, v, out, lse, window, scale, rel_pos_bias, bias_requires_grad):
    if rel_pos_bias is not None and bias_requires_grad:
        dbias = rel_pos_bias.new_empty(rel_pos_bias.shape)
    else:
        dbias = q.new_empty((0,))
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dbias


def _fake_forward_keep_probs(q, k, v, window, scale, rel_pos_bias):
    windows, tokens = _windows_and_tokens(q.shape, window)
    probs = q.new_empty((q.shape[0], windows, q.shape[4], tokens * tokens), dtype=_lse_dtype(q))
    return (*_fake_forward(q, k, v, window, scale, rel_pos_bias), probs)


def _fake_backward_kept_probs(grad_out, q, k, v, out, lse, probs, window, scale, rel_pos_bias, bias_requires_grad):
    return _fake_backward(grad_out, q, k, v, out, lse, window, scale, rel_pos_bias, bias_requires_grad)


torch.library.register_fake("walt::window_attention_keep_probs")(_fake_forward_keep_probs)
torch.library.register_fake("walt::window_attention_backward_kept_probs")(_fake_backward_kept_probs)


# The fused op and its composite twin (csrc/window_attention/composite.cpp, the float32/float64
# path on CUDA, exposed as private ops for tests) have the same outputs.
for _name in ("window_attention", "_window_attention_composite"):
    torch.library.register_fake(f"walt::{_name}")(_fake_forward)
    torch.library.register_fake(f"walt::{_name}_backward")(_fake_backward)


# One autograd formula for both forwards: walt::window_attention returns (out, lse), the CPU
# training op walt::window_attention_keep_probs also the probabilities, which its backward reads.
def _setup_context(ctx, inputs, output):
    q, k, v, window, scale, rel_pos_bias = inputs
    out, lse, *probs = output
    ctx.window, ctx.scale = window, scale
    ctx.bias_requires_grad = rel_pos_bias is not None and ctx.needs_input_grad[5]
    ctx.save_for_backward(q, k, v, out, lse, rel_pos_bias, *probs)
    ctx.mark_non_differentiable(lse, *probs)
    ctx.set_materialize_grads(False)  # else autograd fills zero gradients for lse (and probs, n^2 floats)


def _backward(ctx, grad_out, *_grads_of_lse_and_probs):
    if grad_out is None:  # no gradient reached out (grads are not materialised as zeros)
        return None, None, None, None, None, None
    q, k, v, out, lse, rel_pos_bias, *probs = ctx.saved_tensors
    if grad_out.stride(-1) != 1:  # e.g. expanded from a sum(); the kernel reads d-vectors in place
        grad_out = grad_out.contiguous()
    tail = (ctx.window, ctx.scale, rel_pos_bias, ctx.bias_requires_grad)
    if probs:
        dq, dk, dv, dbias = torch.ops.walt.window_attention_backward_kept_probs(grad_out, q, k, v, out, lse, *probs, *tail)
    else:
        dq, dk, dv, dbias = torch.ops.walt.window_attention_backward(grad_out, q, k, v, out, lse, *tail)
    return dq, dk, dv, None, None, dbias if ctx.bias_requires_grad else None


for _name in ("window_attention", "window_attention_keep_probs"):
    torch.library.register_autograd(f"walt::{_name}", _backward, setup_context=_setup_context)
