"""3D windowed attention: `torch.ops.walt.window_attention` with autograd and fake kernels.

Semantics are those of `walt.ops.reference.window_attention_reference`; see that docstring.
The kernel reads q, k, v in place (any strides, unit stride on d), so views of one fused qkv
projection need no copy.
"""
import operator
import os

import torch

from walt import _C
from walt.ops._fake import check_devices

__all__ = ["window_attention"]

# The op's limits, as its own checks apply them (csrc/window_attention/checks.h): the largest window
# entry, and the most tokens a window may hold on each device type ({"cpu": ..., "cuda": ...}).
_LIMITS = _C.limits()["window_attention"]
MAX_WINDOW_ENTRY = _LIMITS["max_window_entry"]
MAX_WINDOW_TOKENS = _LIMITS["max_window_tokens"]


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
    window: (wt, wh, ww), each in [1, MAX_WINDOW_ENTRY]; clamped to (T, H, W), after which a window
    may hold at most MAX_WINDOW_TOKENS[device type] tokens; partial windows at the far edge attend
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

    The op checks its tensors and the window itself (csrc/window_attention/checks.cpp): each
    mistake is one sentence, a ValueError or a TypeError, whether it comes through here or
    through torch.ops.walt directly.
    """
    window = _check(q, k, v, window, scale, rel_pos_bias)
    if scale is None:
        scale = _default_scale(q)
    if _keep_probs(q, k, v, window, rel_pos_bias):
        out, _, _ = torch.ops.walt.window_attention_keep_probs(q, k, v, window, float(scale), rel_pos_bias)
    else:
        out, _ = torch.ops.walt.window_attention(q, k, v, window, float(scale), rel_pos_bias)
    return out


def _default_scale(q):
    """d**-0.5; a q the op refuses (not 6-D, or d = 0) gets 1.0, then the op's own error."""
    d = q.shape[-1] if q.dim() == 6 else 0
    return d**-0.5 if d > 0 else 1.0


def _windows_and_tokens(shape, window):
    """(number of windows, tokens of a full window) of a (B, T, H, W, ...) input."""
    windows, tokens = 1, 1
    for w, size in zip(window, shape[1:4]):
        w = min(w, size)  # 0 on an empty axis: no windows, no tokens
        windows *= -(-size // w) if w else 0
        tokens *= w
    return windows, tokens


def _keep_probs(q, k, v, window, rel_pos_bias):
    if q.device.type != "cpu" or q.dim() != 6 or not torch.is_grad_enabled():
        return False
    leaves = (q, k, v) if rel_pos_bias is None else (q, k, v, rel_pos_bias)
    if not any(x.requires_grad for x in leaves):
        return False
    windows, tokens = _windows_and_tokens(q.shape, window)
    itemsize = _lse_dtype(q).itemsize  # the probabilities are kept in the accumulation type, like lse
    return q.shape[0] * windows * q.shape[4] * tokens**2 * itemsize <= KEEP_PROBS_MAX_BYTES


def _check(q, k, v, window, scale, rel_pos_bias):
    """What the op cannot check itself: the arguments' Python types, and window as ints. The op
    checks everything about the tensors and the window's entries (csrc/window_attention/checks.cpp),
    one sentence per mistake."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"window_attention: {name} must be a torch.Tensor, got {type(x).__name__}.")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"window_attention: scale must be a number or None, got {type(scale).__name__}.")
    if rel_pos_bias is not None and not isinstance(rel_pos_bias, torch.Tensor):
        raise TypeError(f"window_attention: rel_pos_bias must be a torch.Tensor or None, got {type(rel_pos_bias).__name__}.")
    return _window_entries(window)


def _window_entries(window):
    """window as a list of ints; floats and bools are refused, not truncated. The op takes int64
    entries, so entries beyond int64 are refused here; it checks the rest."""
    try:
        entries = list(window)
    except TypeError:
        entries = None
    if entries is None or not all(_is_integer(w) for w in entries):
        raise TypeError(f"window_attention: window must be a sequence of 3 integers (wt, wh, ww), got {window!r}.")
    entries = [operator.index(w) for w in entries]
    if not all(-(2**63) <= w < 2**63 for w in entries):
        raise ValueError(f"window_attention: window entries must lie in [1, {MAX_WINDOW_ENTRY}], got {tuple(entries)}.")
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
    check_devices("window_attention", "q", q, k=k, v=v, rel_pos_bias=rel_pos_bias)
    return q.new_empty(q.shape), q.new_empty(q.shape[:5], dtype=_lse_dtype(q))


def _fake_backward(grad_out, q, k, v, out, lse, window, scale, rel_pos_bias, bias_requires_grad):
    check_devices("window_attention", "q", q, k=k, v=v, rel_pos_bias=rel_pos_bias, grad_out=grad_out, out=out, lse=lse)
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
    check_devices("window_attention", "q", q, probs=probs)
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
