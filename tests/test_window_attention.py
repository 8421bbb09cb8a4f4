"""walt.ops.window_attention against the float64 oracle, its gradients, registration, determinism,
argument checks and fusion (no tensor-level partition copies)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import walt  # noqa: F401
from attention_inputs import case_id, make_inputs, max_err
from walt.ops import window_attention
from walt.ops.reference import window_attention_reference
from walt.ops.unfused import window_attention_sdpa

LOW = (torch.float32, torch.bfloat16, torch.float16)
OPS = sys.modules["walt.ops.window_attention"]  # the module (walt.ops.window_attention is the function)


@pytest.fixture(params=("kept", "recomputed"))
def probs_policy(request, monkeypatch):
    """Run a test with the CPU forward keeping the softmax probabilities for the backward (the
    default for small windows) and with the backward recomputing them (what larger calls do)."""
    monkeypatch.setattr(OPS, "KEEP_PROBS_MAX_BYTES", 2**40 if request.param == "kept" else 0)
    return request.param


def oracle(q, k, v, window, bias=None, scale=None):
    up = lambda x: None if x is None else x.detach().double()  # noqa: E731
    return window_attention_reference(up(q), up(k), up(v), window, scale=scale, rel_pos_bias=up(bias))


# (shape (B, T, H, W, heads, d), window, bias, layout): a representative matrix, not a product.
CASES = [
    ((1, 2, 3, 4, 1, 8), (1, 1, 1), False, "fused"),  # every token its own window: out == v
    ((2, 3, 6, 10, 3, 16), (1, 3, 5), True, "fused"),  # spatial window, divisible
    ((1, 6, 2, 3, 1, 32), (3, 1, 1), True, "strided"),  # temporal window
    ((1, 7, 11, 13, 3, 17), (3, 5, 7), True, "fused"),  # primes, odd window, odd d: partial on every axis
    ((2, 5, 16, 16, 2, 64), (5, 8, 8), True, "fused"),  # WALT's spatiotemporal window
    ((1, 5, 16, 13, 2, 32), (5, 8, 8), False, "contiguous"),  # non-divisible on one axis
    ((1, 4, 8, 12, 1, 128), (2, 4, 4), True, "strided"),  # d = 128
    ((2, 2, 3, 3, 3, 16), (5, 8, 8), True, "fused"),  # input smaller than the window
    ((1, 5, 9, 7, 3, 8), (2, 4, 4), False, "strided"),  # non-divisible on all axes
    ((0, 2, 4, 4, 1, 8), (2, 2, 2), True, "fused"),  # empty batch
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float64_matches_oracle(case):
    shape, window, bias, layout = case
    q, k, v, table = make_inputs(shape, torch.float64, layout, bias, window)
    out = window_attention(q, k, v, window, rel_pos_bias=table)
    assert out.shape == q.shape and out.dtype == torch.float64 and out.is_contiguous()
    torch.testing.assert_close(out, oracle(q, k, v, window, table), rtol=1e-12, atol=1e-12)


def test_window_of_one_token_returns_v():
    q, k, v, _ = make_inputs((1, 2, 3, 4, 2, 8), torch.float32)
    assert torch.equal(window_attention(q, k, v, (1, 1, 1)), v)


def test_custom_scale_and_windows_are_isolated():
    q, k, v, _ = make_inputs((1, 4, 6, 6, 2, 16), torch.float64, "contiguous")
    out = window_attention(q, k, v, (2, 3, 3), scale=0.3)
    torch.testing.assert_close(out, oracle(q, k, v, (2, 3, 3), scale=0.3), rtol=1e-12, atol=1e-12)
    # Changing keys and values of one window changes that window's outputs and nothing else.
    k2, v2 = k.clone(), v.clone()
    k2[:, :2, :3, :3] += 1.0
    v2[:, :2, :3, :3] -= 1.0
    out2 = window_attention(q, k2, v2, (2, 3, 3), scale=0.3)
    changed = (out2 != out).any(dim=(-1, -2))[0]
    inside = torch.zeros(4, 6, 6, dtype=torch.bool)
    inside[:2, :3, :3] = True
    assert torch.equal(changed, inside)


# Low precision: the kernel's error against the float64 oracle must stay within twice the error
# of the same-precision PyTorch path (window_attention_sdpa in that dtype) plus a floor of a few
# ulps of the dtype at the outputs' magnitude (~1), the rule flash-attention's tests use.
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
LOW_CASES = [CASES[1], CASES[3], CASES[4], CASES[5], CASES[8]]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", LOW_CASES, ids=case_id)
def test_low_precision_forward(case, dtype):
    shape, window, bias, layout = case
    q, k, v, table = make_inputs(shape, dtype, layout, bias, window)
    ref = oracle(q, k, v, window, table)
    out = window_attention(q, k, v, window, rel_pos_bias=table)
    assert out.dtype == dtype
    base = window_attention_sdpa(q, k, v, window, rel_pos_bias=table)
    assert max_err(out, ref) <= 2 * max_err(base, ref) + FLOOR[dtype]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", [CASES[3], CASES[4], CASES[6], CASES[9]], ids=case_id)
def test_backward_matches_oracle(case, dtype, probs_policy):
    shape, window, bias, layout = case
    q, k, v, table = make_inputs(shape, dtype, layout, bias, window)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)

    def grads(fn, cast):
        leaves = [cast(x).requires_grad_() for x in (q, k, v)] + ([cast(table).requires_grad_()] if bias else [])
        out = fn(*leaves[:3], window, rel_pos_bias=leaves[3] if bias else None)
        out.backward(cast(grad))
        return [x.grad for x in leaves]

    ref = grads(window_attention_reference, lambda x: x.detach().double())
    got = grads(window_attention, lambda x: x.detach().clone())
    # (SDPA leaves the bias gradient of an empty batch unset: it is zero.)
    base = [torch.zeros_like(r) if b is None else b for b, r in zip(grads(window_attention_sdpa, lambda x: x.detach().clone()), ref)]
    for name, g, r, b in zip(("dq", "dk", "dv", "dbias"), got, ref, base):
        assert g.dtype == dtype and g.shape == r.shape, name
        # flash-attention's rule for gradients: 3x the same-precision error plus a floor.
        scale = max(max_err(r, torch.zeros_like(r)), 1.0)
        assert max_err(g, r) <= 3 * max_err(b, r) + FLOOR[dtype] * scale, name


@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
def test_gradcheck_float64(bias, probs_policy):
    # A 3x4x5 grid with 2x3x3 windows: partial windows on every axis.
    q, k, v, table = make_inputs((1, 3, 4, 5, 2, 4), torch.float64, "fused", bias, (2, 3, 3), seed=3)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    if bias:
        leaves.append(table.detach().clone().requires_grad_())
    fn = lambda q, k, v, *b: window_attention(q, k, v, (2, 3, 3), rel_pos_bias=b[0] if b else None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_opcheck_both_ops():
    q, k, v, table = make_inputs((1, 3, 4, 5, 2, 8), torch.float32, "fused", True, (2, 3, 3), seed=4)
    q, k, v, table = (x.detach().requires_grad_() for x in (q, k, v, table))
    torch.library.opcheck(torch.ops.walt.window_attention.default, (q, k, v, [2, 3, 3], 0.35, table))
    torch.library.opcheck(torch.ops.walt.window_attention.default, (q.detach(), k.detach(), v.detach(), [2, 3, 3], 0.35, None))
    out, lse = torch.ops.walt.window_attention(q, k, v, [2, 3, 3], 0.35, table)
    for bias_requires_grad in (True, False):
        args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, [2, 3, 3], 0.35, table.detach(), bias_requires_grad)
        torch.library.opcheck(torch.ops.walt.window_attention_backward.default, args)
    # The CPU training pair that keeps the probabilities.
    torch.library.opcheck(torch.ops.walt.window_attention_keep_probs.default, (q, k, v, [2, 3, 3], 0.35, table))
    out, lse, probs = torch.ops.walt.window_attention_keep_probs(q, k, v, [2, 3, 3], 0.35, table)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, probs, [2, 3, 3], 0.35, table.detach(), True)
    torch.library.opcheck(torch.ops.walt.window_attention_backward_kept_probs.default, args)


def test_kept_probabilities_are_the_softmax_and_give_the_recomputed_gradients():
    shape, window = (2, 5, 9, 7, 3, 16), (3, 4, 4)  # partial windows on every axis
    q, k, v, table = make_inputs(shape, torch.float64, "fused", True, window, seed=7)
    out, lse, probs = torch.ops.walt.window_attention_keep_probs(q, k, v, list(window), 0.25, table)
    plain, plain_lse = torch.ops.walt.window_attention(q, k, v, list(window), 0.25, table)
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, plain_lse, rtol=0, atol=0)
    # Window 0 of batch 1 is full (3 x 4 x 4 = 48 tokens); its probabilities are the softmax of its logits.
    n = 48
    qw, kw = (x[1, :3, :4, :4].reshape(n, 3, 16) for x in (q, k))
    logits = torch.einsum("ihd,jhd->hij", qw, kw) * 0.25
    coords = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(n, 3)
    rel = coords[:, None] - coords[None] + torch.tensor([2, 3, 3])
    logits = logits + table[:, rel[..., 0], rel[..., 1], rel[..., 2]]
    torch.testing.assert_close(probs[1, 0].reshape(3, -1)[:, : n * n].reshape(3, n, n), logits.softmax(-1), rtol=1e-12, atol=1e-14)
    # The backward from kept probabilities matches the one that recomputes them.
    grad = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    kept = torch.ops.walt.window_attention_backward_kept_probs(grad, q, k, v, out, lse, probs, list(window), 0.25, table, True)
    recomputed = torch.ops.walt.window_attention_backward(grad, q, k, v, out, lse, list(window), 0.25, table, True)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="probs must be the contiguous"):
        torch.ops.walt.window_attention_backward_kept_probs(grad, q, k, v, out, lse, probs[:, :1], list(window), 0.25, table, True)


def test_float32_softmax_is_within_a_few_ulp_over_the_whole_exp_range():
    # One query against 2000 keys whose logits run from -87 to 0 (d = 1, q = 1, scale 1): the kept
    # probabilities are the kernel's exp / sum, compared with float64 row by row.
    n = 2000
    logits = torch.linspace(-87.0, 0.0, n, dtype=torch.float32)
    q = torch.ones(1, 1, 1, n, 1, 1)
    k = logits.reshape(1, 1, 1, n, 1, 1)
    out, lse, probs = torch.ops.walt.window_attention_keep_probs(q, k, k, [1, 1, n], 1.0, None)
    ref = torch.softmax(logits.double(), 0)
    got = probs[0, 0, 0, :n].double()
    normal = ref > 1e-36  # well inside float32's normal range; below it, subnormals lose digits
    assert ((got[normal] - ref[normal]).abs() / ref[normal]).max() < 6e-7
    assert (got[~normal] - ref[~normal]).abs().max() < 1e-38
    torch.testing.assert_close(lse[0, 0, 0, 0, 0].double(), torch.logsumexp(logits.double(), 0), rtol=1e-6, atol=1e-6)


def test_keep_probs_budget_from_the_environment():
    assert OPS._keep_probs_budget("0") == 0 and OPS._keep_probs_budget("1.5") == 3 * 2**19
    for bad in ("lots", "-1", "nan"):
        with pytest.raises(ValueError, match="WALT_ATTENTION_KEEP_PROBS_MB must be a number of MiB >= 0"):
            OPS._keep_probs_budget(bad)


def test_probabilities_are_kept_only_when_training_on_cpu_within_the_budget(monkeypatch):
    q, k, v, _ = make_inputs((1, 2, 4, 4, 2, 8), torch.float32, "contiguous")
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    assert OPS._keep_probs(*leaves, (2, 4, 4), None)
    assert not OPS._keep_probs(q, k, v, (2, 4, 4), None)  # nothing needs a gradient
    with torch.no_grad():
        assert not OPS._keep_probs(*leaves, (2, 4, 4), None)
    # 1 window x 2 heads x 32^2 floats = 8 KiB: over a 4 KiB budget.
    monkeypatch.setattr(OPS, "KEEP_PROBS_MAX_BYTES", 4096)
    assert not OPS._keep_probs(*leaves, (2, 4, 4), None)


class TinyBlock(torch.nn.Module):
    def __init__(self, dim=16, heads=2, window=(2, 3, 3)):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(heads, *(2 * w - 1 for w in window)))

    def forward(self, x):
        B, T, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, T, H, W, 3, self.heads, C // self.heads).unbind(4)
        o = window_attention(q, k, v, self.window, rel_pos_bias=self.bias)
        return self.proj(o.reshape(B, T, H, W, C))


def test_torch_compile_fullgraph_forward_backward():
    torch.manual_seed(0)
    block = TinyBlock()
    x = torch.randn(2, 3, 4, 5, 16)
    eager_out = block(x)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip((p.grad for p in block.parameters()), eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_bitwise_deterministic_across_runs_and_thread_counts(probs_policy):
    q, k, v, table = make_inputs((2, 5, 9, 7, 3, 16), torch.float32, "fused", True, (3, 4, 4), seed=5)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))

    def run():
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, table)]
        out = window_attention(*leaves[:3], (3, 4, 4), rel_pos_bias=leaves[3])
        out.backward(grad)
        return [out.detach()] + [x.grad for x in leaves]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = run(), run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def _expect(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def test_bad_inputs_raise_clear_errors():
    # The op checks its tensors itself: the same sentence, and the same ValueError or TypeError,
    # through the Python face and through torch.ops.walt.
    q, k, v, table = make_inputs((1, 2, 4, 4, 2, 8), torch.float32, "contiguous", True, (2, 2, 2))
    w = (2, 2, 2)
    op = torch.ops.walt.window_attention
    big = torch.zeros(1, 3, 32, 32, 1, 1)
    cases = [
        (ValueError, r"q must be a 6-D tensor \(B, T, H, W, heads, d\), got 5 dimensions\.$", (q[0], k[0], v[0], w)),
        (ValueError, r"k must have q's shape \[1, 2, 4, 4, 2, 8\], got \[1, 2, 4, 3, 2, 8\]\.$", (q, k[:, :, :, :3], v, w)),
        (TypeError, r"v must have q's dtype Float, got Double\.$", (q, k, v.double(), w)),
        (TypeError, r"q must be float64, float32, bfloat16 or float16, got Long\.$", (q.long(), k.long(), v.long(), w)),
        (ValueError, r"v must have unit stride on its last dimension \(d\), got stride 2\.$",
         (q, k, torch.randn(1, 2, 4, 4, 2, 16)[..., ::2], w)),
        (ValueError, r"q must have unit stride on its last dimension \(d\), got stride 2\.$",
         (torch.randn(1, 2, 4, 4, 2, 16)[..., ::2], k, v, w)),
        (ValueError, r"every window entry must be at least 1, got \[2, 0, 2\]\.$", (q, k, v, (2, 0, 2))),
        (ValueError, r"every window entry must be at least 1, got \[2, -1, 2\]\.$", (q, k, v, (2, -1, 2))),
        (ValueError, r"window must have 3 entries \(wt, wh, ww\), got 2\.$", (q, k, v, (2, 2))),
        (ValueError, r"a window may hold at most 2048 tokens on CPU, got 3072 \(window \[8, 32, 32\] on a \[3, 32, 32\] grid\)\.$",
         (big, big, big, (8, 32, 32))),
    ]
    for exc, match, (q_, k_, v_, w_) in cases:
        _expect(exc, match, lambda: window_attention(q_, k_, v_, w_))
        _expect(exc, match, lambda: op(q_, k_, v_, list(w_), 0.5, None))
    bias_cases = [
        (ValueError, r"rel_pos_bias must have shape \[2, 3, 3, 3\] \(heads, 2\*wt-1, .*\), got \[2, 3, 3\]\.$", table[..., 0]),
        (ValueError, r"rel_pos_bias must have shape \[2, 3, 3, 3\] .* got \[2, 5, 5, 5\]\.$", torch.zeros(2, 5, 5, 5)),
        (TypeError, r"rel_pos_bias must have q's dtype or float32, got Double\.$", table.double()),
    ]
    for exc, match, bias in bias_cases:
        _expect(exc, match, lambda: window_attention(q, k, v, w, rel_pos_bias=bias))
        _expect(exc, match, lambda: op(q, k, v, list(w), 0.5, bias))
    _expect(ValueError, r"scale must be a finite number, got inf\.$", lambda: window_attention(q, k, v, w, scale=float("inf")))
    # What only the Python face checks: the arguments' Python types and window as integers.
    _expect(TypeError, r"window must be a sequence of 3 integers", lambda: window_attention(q, k, v, 2))
    _expect(TypeError, r"scale must be a number or None, got str", lambda: window_attention(q, k, v, w, scale="0.5"))
    _expect(TypeError, r"k must be a torch.Tensor, got list", lambda: window_attention(q, [1.0], v, w))
    _expect(TypeError, r"rel_pos_bias must be a torch.Tensor or None, got float", lambda: window_attention(q, k, v, w, rel_pos_bias=0.5))
    # A mix of meta and real tensors is dispatched to the fake kernel, which refuses it in the same words.
    _expect(ValueError, r"k must be on q's device cpu, got meta\.$", lambda: window_attention(q, k.to("meta"), v, w))
    _expect(ValueError, r"k must be on q's device cpu, got meta\.$", lambda: op(q, k.to("meta"), v, list(w), 0.5, None))
    out, lse = op(q, k, v, [2, 2, 2], 0.5, None)
    bwd = torch.ops.walt.window_attention_backward
    _expect(ValueError, r"lse must have shape \[1, 2, 4, 4, 2\] \(B, T, H, W, heads\), got \[1, 2, 4, 4\]\.$", lambda: bwd(out, q, k, v, out, lse[..., 0], [2, 2, 2], 0.5, None, False))
    _expect(TypeError, r"lse must be Float for Float inputs, got Double\.$", lambda: bwd(out, q, k, v, out, lse.double(), [2, 2, 2], 0.5, None, False))
    _expect(ValueError, r"grad_out must have q's shape", lambda: bwd(out[:, :1], q, k, v, out, lse, [2, 2, 2], 0.5, None, False))


def test_token_limits_come_from_the_op():
    import walt._C

    limits = walt._C.limits()["window_attention"]
    assert OPS.MAX_WINDOW_TOKENS == limits["max_window_tokens"] and set(limits["max_window_tokens"]) == {"cpu", "cuda"}
    assert OPS.MAX_WINDOW_ENTRY == limits["max_window_entry"] == 2**31 - 1
    n = OPS.MAX_WINDOW_TOKENS["cpu"]
    q = torch.zeros(1, 1, 1, n + 1, 1, 1)
    window_attention(q[:, :, :, :n], q[:, :, :, :n], q[:, :, :, :n], (1, 1, n))  # the limit itself is allowed
    _expect(ValueError, f"at most {n} tokens on CPU, got {n + 1}", lambda: window_attention(q, q, q, (1, 1, n + 1)))


def test_profiler_shows_one_fused_call_and_no_copies(probs_policy):
    q, k, v, table = make_inputs((1, 5, 9, 7, 2, 16), torch.float32, "fused", True, (5, 8, 8))
    leaves = [x.detach().requires_grad_() for x in (q, k, v, table)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = window_attention(*leaves[:3], (5, 8, 8), rel_pos_bias=leaves[3])
    names = [e.name for e in prof.events()]
    forward, backward = {
        "kept": ("walt::window_attention_keep_probs", "walt::window_attention_backward_kept_probs"),
        "recomputed": ("walt::window_attention", "walt::window_attention_backward"),
    }[probs_policy]
    assert names.count(forward) == 1
    copies = {"aten::permute", "aten::copy_", "aten::constant_pad_nd", "aten::pad", "aten::contiguous", "aten::clone", "aten::reshape", "aten::_to_copy"}
    assert not copies & set(names), sorted(copies & set(names))
    # The backward is one fused call as well.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(torch.ones_like(out))
    names = [e.name for e in prof.events()]
    assert names.count(backward) == 1
    assert not {"aten::permute", "aten::constant_pad_nd", "aten::pad", "aten::contiguous", "aten::_to_copy"} & set(names)


# The other ISA paths (AVX2 row loops and the AVX2 GEMM, bf16 through gathered operands; plain
# loops with the BLAS GEMM) run on any x86 machine when capped with WALT_CPU_ISA, which is read
# once per process. Two geometries: partial 3x4x4 windows at d = 16, and one 256-token window at
# d = 20 (GEMM panels of 16 columns plus a masked 4, row blocks of 6 plus 4).
_ISA_SCRIPT = textwrap.dedent(
    """
    import itertools, sys, torch, walt
    from walt.ops import window_attention
    from walt.ops.reference import window_attention_reference
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    ops = sys.modules["walt.ops.window_attention"]
    geometries = (((2, 5, 9, 7), 2, 16, (3, 4, 4)), ((1, 2, 16, 16), 1, 20, (1, 16, 16)))
    cases = ((1 << 40, torch.float32, 2e-5), (0, torch.float32, 2e-5), (1 << 40, torch.bfloat16, 3e-2))
    for (grid, heads, d, window), (keep, dtype, tol) in itertools.product(geometries, cases):
        ops.KEEP_PROBS_MAX_BYTES = keep  # probabilities kept for the backward, or recomputed
        q, k, v = torch.randn(*grid, 3, heads, d, generator=g).to(dtype).unbind(4)
        bias = torch.randn(heads, *(2 * w - 1 for w in window), generator=g)
        grad = torch.randn(q.shape, generator=g).to(dtype)
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, bias)]
        out = window_attention(*leaves[:3], window, rel_pos_bias=leaves[3])
        out.backward(grad)
        ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v, bias)]
        ref = window_attention_reference(*ref_leaves[:3], window, rel_pos_bias=ref_leaves[3])
        ref.backward(grad.double())
        pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(leaves, ref_leaves)]
        for a, b in pairs:
            err = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1)).item()
            assert err < tol, (dtype, err)
            worst = max(worst, err)
    # This ISA's exp, as in test_float32_softmax_is_within_a_few_ulp_over_the_whole_exp_range.
    logits = torch.linspace(-87.0, 0.0, 2000)
    _, lse, probs = torch.ops.walt.window_attention_keep_probs(
        torch.ones(1, 1, 1, 2000, 1, 1), logits.view(1, 1, 1, 2000, 1, 1), logits.view(1, 1, 1, 2000, 1, 1),
        [1, 1, 2000], 1.0, None)
    ref, got = torch.softmax(logits.double(), 0), probs[0, 0, 0, :2000].double()
    normal = ref > 1e-36
    assert ((got[normal] - ref[normal]).abs() / ref[normal]).max() < 6e-7
    assert (got[~normal] - ref[~normal]).abs().max() < 1e-38
    torch.testing.assert_close(lse[0, 0, 0, 0, 0].double(), torch.logsumexp(logits.double(), 0), rtol=1e-6, atol=1e-6)
    print("ok", worst, walt._C.attention_cpu_path(), walt._C.cpu_features()["avx2"])
    """
)


@pytest.mark.parametrize("isa", ("avx2", "baseline"))
def test_other_isa_paths_match_oracle(isa):
    env = dict(os.environ, WALT_CPU_ISA=isa, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
    # The path that ran, as `python -m walt.info` reports it (a CPU without AVX2 runs the baseline).
    has_avx2 = run.stdout.split()[-1] == "True"
    expected = "avx2 loops, walt GEMM" if isa == "avx2" and has_avx2 else "baseline loops, BLAS GEMM"
    assert expected in run.stdout, run.stdout


_CAP_SCRIPT = """
import torch, walt
from walt.ops import add_noise
try:
    path = walt._C.attention_cpu_path()
    add_noise(torch.zeros(1, 4), torch.tensor([0]), torch.linspace(0.9, 0.1, 10))
    print(path)
except RuntimeError as e:
    print("error:", e)
"""


@pytest.mark.parametrize("cap", ("avx512", "avx512f", "avx2", "baseline", "sse9"))
def test_both_ops_read_one_isa_cap(cap):
    # WALT_CPU_ISA has one vocabulary (walt/cpu_features.h): attention and noise accept the same
    # values, and refuse the same ones in the same words.
    env = dict(os.environ, WALT_CPU_ISA=cap, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", _CAP_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout.strip()
    features = walt._C.cpu_features()
    if cap == "sse9":
        assert out == "error: WALT_CPU_ISA must be one of 'baseline', 'avx2' or 'avx512', got 'sse9'.", out
    elif cap.startswith("avx512") and features["avx512f"]:
        assert out == "avx512f loops, walt GEMM", out
    elif cap != "baseline" and features["avx2"]:
        assert out == "avx2 loops, walt GEMM", out
    else:
        assert out == "baseline loops, BLAS GEMM", out


# Every op on inputs without elements, each in a fresh interpreter: a crash in native code (SIGFPE,
# SIGSEGV) then fails one case instead of killing pytest.
_EMPTY_SCRIPT = textwrap.dedent("""
    import sys, torch, walt
    shape, how = [int(s) for s in sys.argv[1].split(",")], sys.argv[2]
    q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
    bias = torch.randn(shape[4], 3, 3, 3, requires_grad=True)
    ops = torch.ops.walt
    if how == "op":
        out, lse = ops.window_attention(q, k, v, [2, 2, 2], 0.5, bias)
        assert out.shape == q.shape and lse.shape == q.shape[:5]
        dq, dk, dv, db = ops.window_attention_backward(out.expand(q.shape), q, k, v, out, lse, [2, 2, 2], 0.5, bias, True)
        assert dq.shape == q.shape and torch.equal(db, torch.zeros_like(bias))
    elif how == "keep_probs":
        out, lse, probs = ops.window_attention_keep_probs(q, k, v, [2, 2, 2], 0.5, None)
        assert out.shape == q.shape and probs.numel() == 0
        dq, _, _, _ = ops.window_attention_backward_kept_probs(out, q, k, v, out, lse, probs, [2, 2, 2], 0.5, None, False)
        assert dq.shape == q.shape
    elif how == "composite":
        out, lse = ops._window_attention_composite(q, k, v, [2, 2, 2], 0.5, None)
        dq, _, _, _ = ops._window_attention_composite_backward(out, q, k, v, out, lse, [2, 2, 2], 0.5, None, False)
        assert out.shape == dq.shape == q.shape
    elif how == "fake":  # the fake kernels (torch.compile, meta) agree with the op on the shapes
        from torch._subclasses.fake_tensor import FakeTensorMode

        real = ops.window_attention_keep_probs(q, k, v, [2, 2, 2], 0.5, None)
        plain = q.detach()
        with FakeTensorMode() as mode:
            fq = mode.from_tensor(plain)
            fake = ops.window_attention_keep_probs(fq, fq, fq, [2, 2, 2], 0.5, None)
        assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]
    else:  # the public function under autograd, gradients of a sum (an expanded, stride-0 grad_out)
        out = walt.ops.window_attention(q, k, v, (2, 2, 2), rel_pos_bias=bias)
        out.sum().backward()
        assert out.shape == q.shape and q.grad.shape == q.shape and torch.equal(bias.grad, torch.zeros_like(bias))
    print("ok")
""")


@pytest.mark.parametrize("how", ["op", "keep_probs", "composite", "fake", "autograd"])
@pytest.mark.parametrize("shape", [(0, 2, 2, 2, 2, 4), (1, 0, 2, 2, 2, 4), (1, 2, 0, 2, 2, 4), (1, 2, 2, 0, 2, 4),
                                   (1, 2, 2, 2, 0, 4), (2, 0, 0, 0, 2, 4)], ids=lambda s: "x".join(map(str, s)))
def test_empty_inputs_give_empty_results_and_gradients(shape, how):
    root = os.path.dirname(os.path.dirname(walt.__file__))  # the walt under test
    res = subprocess.run([sys.executable, "-c", _EMPTY_SCRIPT, ",".join(map(str, shape)), how], cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-2000:])


def test_window_entries_must_be_integers_in_range():
    q = torch.randn(1, 2, 4, 4, 2, 8)
    _expect(TypeError, r"window must be a sequence of 3 integers \(wt, wh, ww\), got \(1.9, 2.7, 2.2\)",
            lambda: window_attention(q, q, q, (1.9, 2.7, 2.2)))
    _expect(TypeError, r"window must be a sequence of 3 integers", lambda: window_attention(q, q, q, (True, 2, 2)))
    # Beyond int64 an entry cannot reach the op: the Python face refuses it; the op refuses the rest.
    _expect(ValueError, r"window entries must lie in \[1, 2147483647\], got \(9223372036854775808, 2, 2\)",
            lambda: window_attention(q, q, q, (2**63, 2, 2)))
    _expect(ValueError, r"every window entry must be at most 2147483647 \(2\*\*31 - 1\), got \[4611686018427387904, 2, 2\]",
            lambda: window_attention(q, q, q, (2**62, 2, 2)))
    _expect(ValueError, r"every window entry must be at most 2147483647",
            lambda: torch.ops.walt.window_attention(q, q, q, [2**62, 2, 2], 0.5, None))
    import numpy as np

    out = window_attention(q, q, q, np.array([2, 2, 2]))  # integer types of any kind are fine
    torch.testing.assert_close(out, window_attention(q, q, q, (2, 2, 2)))
