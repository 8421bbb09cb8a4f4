"""The composite window attention (csrc/window_attention/composite.cpp, the float32/float64 path on
CUDA) run on the CPU through its private ops: against the float64 oracle and its autograd, against
the fused CPU kernel, determinism, and the bias-gradient fold on tables larger than the window."""
import pytest
import torch

import walt  # noqa: F401
from attention_inputs import case_id, max_err
from attention_inputs import make_inputs as make_qkv
from walt.ops.reference import window_attention_reference
from walt.ops.unfused import window_attention_sdpa

fwd = torch.ops.walt._window_attention_composite
bwd = torch.ops.walt._window_attention_composite_backward


@pytest.fixture(autouse=True)
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


def make_inputs(shape, dtype, layout, bias, window, seed=0):
    """q, k, v and a bias table (attention_inputs.make_inputs), and a gradient for the output."""
    q, k, v, table = make_qkv(shape, dtype, layout, bias, window, seed)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return q, k, v, table, grad


def composite(q, k, v, window, table, grad, scale=None):
    """Forward and backward through the composite ops, the backward fed the forward's lse."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = fwd(q, k, v, list(window), scale, table)
    dq, dk, dv, dbias = bwd(grad, q, k, v, out, lse, list(window), scale, table, table is not None)
    return out, lse, [dq, dk, dv] + ([dbias] if table is not None else [])


def autograd_of(fn, q, k, v, window, table, grad, cast):
    leaves = [cast(x).requires_grad_() for x in (q, k, v)] + ([cast(table).requires_grad_()] if table is not None else [])
    out = fn(*leaves[:3], window, rel_pos_bias=leaves[3] if table is not None else None)
    out.backward(cast(grad))
    # (SDPA leaves the bias gradient of an empty batch unset: it is zero.)
    return out.detach(), [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]


def oracle(q, k, v, window, table, grad):
    return autograd_of(window_attention_reference, q, k, v, window, table, grad, lambda x: x.detach().double())


# (shape (B, T, H, W, heads, d), window, bias, layout)
CASES = [
    ((1, 2, 3, 4, 1, 8), (1, 1, 1), True, "fused"),  # one token per window: out == v, dbias has one entry
    ((2, 3, 6, 10, 3, 16), (1, 3, 5), True, "fused"),  # spatial window, divisible
    ((1, 3, 1, 6, 3, 8), (1, 4, 4), True, "contiguous"),  # H smaller than the window, W not divisible
    ((1, 7, 11, 13, 3, 17), (3, 5, 7), True, "fused"),  # primes, odd d: partial windows on every axis
    ((2, 5, 16, 16, 2, 64), (5, 8, 8), True, "fused"),  # WALT's spatiotemporal window
    ((1, 5, 16, 13, 1, 64), (5, 8, 8), False, "contiguous"),  # non-divisible on one axis
    ((2, 2, 3, 3, 3, 16), (5, 8, 8), True, "fused"),  # grid smaller than the window on every axis
    ((1, 5, 9, 7, 3, 8), (2, 4, 4), False, "strided"),  # non-divisible on every axis
    ((1, 4, 8, 12, 1, 5), (2, 4, 4), True, "strided"),  # divisible, odd d
    ((0, 2, 4, 4, 3, 8), (2, 2, 2), True, "fused"),  # empty batch
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float64_matches_oracle_and_its_autograd(case):
    shape, window, bias, layout = case
    q, k, v, table, grad = make_inputs(shape, torch.float64, layout, bias, window)
    out, lse, grads = composite(q, k, v, window, table, grad)
    ref_out, ref_grads = oracle(q, k, v, window, table, grad)
    assert out.dtype == torch.float64 and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float64 and lse.shape == q.shape[:5]
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert g.dtype == torch.float64 and g.is_contiguous(), name
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11, msg=name)


# float32: the composite's error against the float64 oracle stays within 2x (outputs) or 3x
# (gradients) the error of the float32 PyTorch path (partition + SDPA), plus a floor of a few ulps,
# the rule tests/test_window_attention.py applies to the fused kernel.
FLOOR = 1e-6


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_within_pytorch_float32_error(case):
    shape, window, bias, layout = case
    q, k, v, table, grad = make_inputs(shape, torch.float32, layout, bias, window)
    out, lse, grads = composite(q, k, v, window, table, grad)
    ref_out, ref_grads = oracle(q, k, v, window, table, grad)
    base_out, base_grads = autograd_of(window_attention_sdpa, q, k, v, window, table, grad, lambda x: x.detach().clone())
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and out.is_contiguous()
    assert max_err(out, ref_out) <= 2 * max_err(base_out, ref_out) + FLOOR
    for name, g, r, b in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, base_grads):
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        scale = max(max_err(r, torch.zeros_like(r)), 1.0)
        assert max_err(g, r) <= 3 * max_err(b, r) + FLOOR * scale, name


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[4], CASES[7]], ids=case_id)
def test_agrees_with_fused_cpu_kernel(case, dtype):
    shape, window, bias, layout = case
    q, k, v, table, grad = make_inputs(shape, dtype, layout, bias, window, seed=1)
    scale = 0.3
    out, lse, grads = composite(q, k, v, window, table, grad, scale=scale)
    f_out, f_lse = torch.ops.walt.window_attention(q, k, v, list(window), scale, table)
    f_grads = torch.ops.walt.window_attention_backward(grad, q, k, v, f_out, f_lse, list(window), scale, table, bias)
    # Both paths are ~1-3e-6 off the oracle in float32 (~1e-15 in float64) and round differently,
    # so they agree to a few ulps of each result's largest value (dbias sums over every window).
    tol = 1e-12 if dtype == torch.float64 else 4e-6
    assert lse.dtype == f_lse.dtype and lse.shape == f_lse.shape
    for name, g, f in zip(("out", "lse", "dq", "dk", "dv", "dbias"), [out, lse] + grads, [f_out, f_lse] + list(f_grads)):
        assert max_err(g, f) <= tol * max(f.abs().max().item(), 1.0), name


def test_one_token_windows_return_v_and_bias_has_no_effect():
    q, k, v, table, grad = make_inputs((1, 2, 3, 4, 2, 8), torch.float32, "fused", True, (1, 1, 1))
    out, lse, (dq, dk, dv, dbias) = composite(q, k, v, (1, 1, 1), table, grad)
    assert torch.equal(out, v) and torch.equal(dv, grad)
    assert torch.equal(dq, torch.zeros_like(q)) and torch.equal(dk, torch.zeros_like(k))
    assert torch.equal(dbias, torch.zeros_like(table))


def test_bias_gradient_is_zero_beyond_the_clamped_window():
    # Grid (2, 3, 3) under a requested (5, 8, 8) window: only offsets |a - b| < (2, 3, 3) occur.
    shape, window = (2, 2, 3, 3, 3, 16), (5, 8, 8)
    q, k, v, table, grad = make_inputs(shape, torch.float64, "fused", True, window)
    _, _, grads = composite(q, k, v, window, table, grad)
    dbias = grads[3]
    reached = torch.zeros(dbias.shape, dtype=torch.bool)
    reached[:, 5 - 2 : 5 + 1, 8 - 3 : 8 + 2, 8 - 3 : 8 + 2] = True
    assert torch.equal(dbias[~reached], torch.zeros_like(dbias[~reached]))
    assert (dbias[reached] != 0).all()  # 3 heads x 3 x 5 x 5 offsets, each reached by some pair
    torch.testing.assert_close(dbias, oracle(q, k, v, window, table, grad)[1][3], rtol=1e-11, atol=1e-11)


def test_bias_gradient_dtype_and_empty_when_not_wanted():
    q, k, v, table, grad = make_inputs((1, 3, 4, 5, 2, 8), torch.float64, "fused", True, (2, 3, 3))
    table = table.float()  # float32 tables are allowed with any q dtype
    out, lse = fwd(q, k, v, [2, 3, 3], 0.35, table)
    *_, dbias = bwd(grad, q, k, v, out, lse, [2, 3, 3], 0.35, table, True)
    assert dbias.dtype == torch.float32 and dbias.shape == table.shape
    *_, none = bwd(grad, q, k, v, out, lse, [2, 3, 3], 0.35, table, False)
    assert none.numel() == 0


def test_half_precision_inputs_are_upcast():
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, table, grad = make_inputs((1, 3, 5, 6, 2, 16), dtype, "fused", True, (2, 4, 4))
        out, lse, grads = composite(q, k, v, (2, 4, 4), table, grad)
        ref_out, ref_grads = oracle(q, k, v, (2, 4, 4), table, grad)
        assert out.dtype == dtype and lse.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
        ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        assert max_err(out, ref_out) <= 2 * ulp
        for g, r in zip(grads, ref_grads):
            assert max_err(g, r) <= 2 * ulp * max(r.abs().max().item(), 1.0)


def test_bitwise_deterministic_across_runs_and_thread_counts():
    q, k, v, table, grad = make_inputs((2, 5, 9, 7, 3, 16), torch.float32, "fused", True, (3, 4, 4), seed=5)
    first = composite(q, k, v, (3, 4, 4), table, grad)
    second = composite(q, k, v, (3, 4, 4), table, grad)
    torch.set_num_threads(1)
    single = composite(q, k, v, (3, 4, 4), table, grad)
    for run in (second, single):
        assert torch.equal(run[0], first[0]) and torch.equal(run[1], first[1])
        assert all(torch.equal(a, b) for a, b in zip(run[2], first[2]))  # dq, dk, dv, dbias


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, window, scale):
        out, lse = fwd(q, k, v, window, scale, table)
        ctx.save_for_backward(q, k, v, table, out, lse)
        ctx.window, ctx.scale = window, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, table, out, lse = ctx.saved_tensors
        dq, dk, dv, dbias = bwd(grad.contiguous(), q, k, v, out, lse, ctx.window, ctx.scale, table, True)
        return dq, dk, dv, dbias, None, None


def test_gradcheck_float64():
    # A 3x4x5 grid with 2x3x3 windows: partial windows on every axis.
    q, k, v, table, _ = make_inputs((1, 3, 4, 5, 2, 3), torch.float64, "fused", True, (2, 3, 3), seed=3)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, table)]
    assert torch.autograd.gradcheck(lambda *x: _Composite.apply(*x, [2, 3, 3], 0.45), leaves, fast_mode=True)


def test_opcheck_and_shared_argument_checks():
    q, k, v, table, grad = make_inputs((1, 3, 4, 5, 2, 8), torch.float32, "fused", True, (2, 3, 3), seed=4)
    torch.library.opcheck(fwd.default, (q, k, v, [2, 3, 3], 0.35, table))
    out, lse = fwd(q, k, v, [2, 3, 3], 0.35, table)
    torch.library.opcheck(bwd.default, (grad, q, k, v, out, lse, [2, 3, 3], 0.35, table, True))
    with pytest.raises(ValueError, match=r"every window entry must be at least 1, got \[2, 0, 3\]"):
        fwd(q, k, v, [2, 0, 3], 0.35, None)
    with pytest.raises(TypeError, match=r"lse must be Float for Float inputs, got Double"):
        bwd(grad, q, k, v, out, lse.double(), [2, 3, 3], 0.35, table, True)
