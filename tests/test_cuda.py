"""CUDA kernels of both ops against the float64 oracles, the CPU kernels and diffusers.

Marked `cuda`: skipped (with the reason shown) on machines without a GPU; `make gpu-check` runs
them. The low-precision rule is flash-attention's: the kernel's error against the float64 oracle
is at most 2x (outputs) or 3x (gradients) the error of the same-precision PyTorch path, plus a
rounding floor. float32 runs on the composite fallback (csrc/window_attention/composite.cpp) and
meets the same rule; torch's default float32 matmul precision (no TF32) is assumed.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import walt  # noqa: F401
from attention_inputs import case_id
from walt.diffusion import make_schedule
from walt.ops import add_noise, window_attention
from walt.ops.reference import window_attention_reference
from walt.ops.unfused import window_attention_sdpa

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

DEV = "cuda"
FLOOR = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def qkv(shape, dtype, layout="fused", seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, H, W, heads, d = shape
    if layout == "fused":  # views of one qkv projection, as the transformer makes them
        return [x.to(DEV, dtype) for x in torch.randn(B, T, H, W, 3, heads, d, generator=g).unbind(4)]
    return [torch.randn(shape, generator=g).to(DEV, dtype) for _ in range(3)]


def bias_table(heads, window, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, *(2 * w - 1 for w in window), generator=g).to(DEV, dtype)


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def oracle_with_grads(q, k, v, window, table, grad):
    leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    tab = None if table is None else table.detach().double().cpu().requires_grad_()
    out = window_attention_reference(*leaves, window, rel_pos_bias=tab)
    out.backward(grad.double().cpu())
    grads = [x.grad for x in leaves] + ([tab.grad] if tab is not None else [])
    return out.detach(), grads


def run(fn, q, k, v, window, table, grad):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    tab = None if table is None else table.detach().clone().requires_grad_()
    out = fn(*leaves, window, rel_pos_bias=tab)
    out.backward(grad)
    grads = [x.grad for x in leaves] + ([tab.grad] if tab is not None else [])
    return out.detach(), grads


# (shape (B, T, H, W, heads, d), window, bias, layout)
CASES = [
    ((2, 5, 16, 16, 4, 64), (5, 8, 8), True, "fused"),  # WALT's spatiotemporal window
    ((2, 5, 16, 16, 4, 64), (1, 16, 16), True, "fused"),  # WALT's spatial window
    ((1, 4, 14, 14, 2, 32), (4, 7, 7), True, "fused"),  # 196 tokens: not a multiple of the 64-row tile
    ((1, 7, 11, 13, 3, 96), (3, 5, 7), True, "contiguous"),  # primes: partial windows on every axis
    ((2, 3, 9, 9, 1, 128), (2, 4, 4), False, "fused"),  # d = 128, partial windows
    ((1, 2, 3, 3, 2, 32), (5, 8, 8), True, "fused"),  # input smaller than the window
    ((1, 2, 4, 4, 2, 64), (1, 1, 1), False, "contiguous"),  # one token per window: out == v
    ((0, 2, 4, 4, 2, 32), (2, 2, 2), True, "fused"),  # empty batch
]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_backward_against_oracle(case, dtype):
    shape, window, with_bias, layout = case
    q, k, v = qkv(shape, dtype, layout)
    table = bias_table(shape[4], window, torch.float32) if with_bias else None
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(DEV, dtype)
    ref_out, ref_grads = oracle_with_grads(q, k, v, window, table, grad)
    out, grads = run(window_attention, q, k, v, window, table, grad)
    base_out, base_grads = run(window_attention_sdpa, q, k, v, window, table, grad)
    # (SDPA leaves the bias gradient of an empty batch unset: it is zero.)
    base_grads = [torch.zeros_like(r) if b is None else b for b, r in zip(base_grads, ref_grads)]
    assert out.dtype == dtype and out.device.type == "cuda"
    assert err(out.cpu(), ref_out) <= 2 * err(base_out.cpu(), ref_out) + FLOOR[dtype]
    for name, g, b, r in zip(("dq", "dk", "dv", "dbias"), grads, base_grads, ref_grads):
        assert err(g.cpu(), r) <= 3 * err(b.cpu(), r) + 2 * FLOOR[dtype], name


def test_one_token_windows_return_v():
    q, k, v = qkv((1, 2, 4, 4, 2, 64), torch.bfloat16, "contiguous")
    assert torch.equal(window_attention(q, k, v, (1, 1, 1)), v)


def test_grid_beyond_65535_ctas():
    # 32 batches x 256 windows x 8 heads = 65536 (batch, window, head) tasks, forward and backward.
    shape, window = (32, 1, 64, 64, 8, 32), (1, 4, 4)
    q, k, v = qkv(shape, torch.bfloat16)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(DEV, torch.bfloat16)
    out, grads = run(window_attention, q, k, v, window, None, grad)
    last = slice(-1, None)  # the last batch holds the highest task indices
    ref_out, ref_grads = oracle_with_grads(q[last], k[last], v[last], window, None, grad[last])
    base_out, base_grads = run(window_attention_sdpa, q[last], k[last], v[last], window, None, grad[last])
    assert err(out[last].cpu(), ref_out) <= 2 * err(base_out.cpu(), ref_out) + FLOOR[torch.bfloat16]
    for g, b, r in zip(grads, base_grads, ref_grads):
        assert err(g[last].cpu(), r) <= 3 * err(b.cpu(), r) + 2 * FLOOR[torch.bfloat16]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_backward_is_bitwise_deterministic(dtype):
    shape, window = (2, 5, 16, 16, 4, 64), (5, 8, 8)
    q, k, v = qkv(shape, dtype)
    table = bias_table(4, window, torch.float32)
    grad = torch.randn(shape, device=DEV, dtype=dtype)
    first = run(window_attention, q, k, v, window, table, grad)
    for _ in range(3):
        again = run(window_attention, q, k, v, window, table, grad)
        assert torch.equal(again[0], first[0])
        assert all(torch.equal(a, b) for a, b in zip(again[1], first[1]))


def test_cuda_agrees_with_cpu_kernel():
    shape, window = (1, 5, 16, 16, 2, 64), (5, 8, 8)
    q, k, v = qkv(shape, torch.bfloat16)
    table = bias_table(2, window, torch.float32)
    cuda_out = window_attention(q, k, v, window, rel_pos_bias=table)
    cpu_out = window_attention(q.cpu(), k.cpu(), v.cpu(), window, rel_pos_bias=table.cpu())
    assert err(cuda_out.cpu(), cpu_out) <= 2e-2


def test_float32_cuda_agrees_with_cpu_kernel_and_is_the_composite():
    shape, window = (1, 7, 11, 13, 3, 64), (3, 5, 7)
    q, k, v = qkv(shape, torch.float32)
    table = bias_table(3, window, torch.float32)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(DEV)
    cuda_out, cuda_grads = run(window_attention, q, k, v, window, table, grad)
    cpu_out, cpu_grads = run(window_attention, q.cpu(), k.cpu(), v.cpu(), window, table.cpu(), grad.cpu())
    assert cuda_out.dtype == torch.float32
    # Both are float32 to a few ulps of each result's largest value (the CPU kernel and the composite
    # are each ~1e-6 off the float64 oracle here).
    for name, g, c in zip(("out", "dq", "dk", "dv", "dbias"), [cuda_out] + cuda_grads, [cpu_out] + cpu_grads):
        assert err(g.cpu(), c) <= 1e-5 * max(c.abs().max().item(), 1.0), name
    # float32 on CUDA is the composite fallback: the same arithmetic as its private op.
    scale = shape[-1] ** -0.5
    out, lse = torch.ops.walt.window_attention(q, k, v, list(window), scale, table)
    c_out, c_lse = torch.ops.walt._window_attention_composite(q, k, v, list(window), scale, table)
    assert torch.equal(out, c_out) and torch.equal(lse, c_lse)


def test_fallback_takes_any_head_size_and_float64():
    shape, window = (1, 3, 6, 5, 2, 48), (2, 4, 4)  # d = 48: no tensor-core kernel
    table = bias_table(2, window, torch.float32)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        q, k, v = qkv(shape, dtype)
        ref_out, ref_grads = oracle_with_grads(q, k, v, window, table, grad)
        out, grads = run(window_attention, q, k, v, window, table.to(dtype), grad.to(DEV, dtype))
        assert out.dtype == dtype and out.device.type == "cuda"
        for name, g, r in zip(("out", "dq", "dk", "dv", "dbias"), [out] + grads, [ref_out] + ref_grads):
            assert err(g.cpu(), r) <= tol * max(r.abs().max().item(), 1.0), (dtype, name)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("shape", [(0, 2, 2, 2, 2, 32), (1, 0, 2, 2, 2, 32), (1, 2, 2, 0, 2, 32), (1, 2, 2, 2, 0, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_empty_inputs_give_empty_results_in_a_fresh_process(shape, dtype):
    """Like the CPU test: in a subprocess, so a crash in a kernel launch fails one case only."""
    code = (
        "import sys, torch, walt\n"
        f"q, k, v = (torch.randn({shape}, device='cuda', dtype={dtype}, requires_grad=True) for _ in range(3))\n"
        f"bias = torch.randn({shape[4]}, 3, 3, 3, device='cuda', requires_grad=True)\n"
        "out = walt.ops.window_attention(q, k, v, (2, 2, 2), rel_pos_bias=bias)\n"
        "out.sum().backward()\n"
        "torch.cuda.synchronize()\n"
        "assert out.shape == q.grad.shape == q.shape and torch.equal(bias.grad, torch.zeros_like(bias))\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(walt.__file__))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": root},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-2000:])


def test_unsupported_cuda_inputs_raise_clear_errors():
    q, k, v = qkv((1, 2, 4, 4, 2, 48), torch.bfloat16)
    with pytest.raises(RuntimeError, match="head sizes d of 32, 64, 96 or 128"):
        window_attention(q, k, v, (1, 2, 2))


# -- noise ---------------------------------------------------------------------------------------

def test_noise_cuda_matches_cpu_generator():
    x0 = torch.randn(3, 8, 5, 17, 17)
    t = torch.tensor([0, 500, 999])
    ab = make_schedule().float()
    keys = torch.tensor([7, 123456789012, 3])
    cpu = add_noise(x0, t, ab, seed=11, keys=keys)
    gpu = add_noise(x0.to(DEV), t.to(DEV), ab.to(DEV), seed=11, keys=keys.to(DEV))
    for a, b in zip(cpu, gpu):
        assert err(a, b.cpu()) <= 1e-6


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_noise_cuda_with_explicit_eps_matches_cpu(dtype):
    x0 = torch.randn(4, 3, 7, 9).to(dtype)
    eps = torch.randn(4, 3, 7, 9).to(dtype)
    t = torch.tensor([1, 10, 600, 999])
    ab = make_schedule().to(torch.float64 if dtype == torch.float64 else torch.float32)
    for target in ("v", "eps", "x0"):
        cpu = add_noise(x0, t, ab, noise=eps, target=target)
        gpu = add_noise(x0.to(DEV), t.to(DEV), ab.to(DEV), noise=eps.to(DEV), target=target)
        for a, b in zip(cpu, gpu):
            assert torch.equal(a, b.cpu()), target


def test_noise_cuda_bitwise_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", rescale_betas_zero_snr=True)
    x0 = torch.randn(6, 8, 5, 16, 16, device=DEV)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 1, 200, 500, 998, 999], device=DEV)
    ab = sched.alphas_cumprod.to(DEV)
    x_t, v = add_noise(x0, t, ab, noise=eps)
    assert torch.equal(x_t, sched.add_noise(x0, eps, t))
    assert torch.equal(v, sched.get_velocity(x0, eps, t))


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not installed")
def test_compute_sanitizer_is_clean():
    script = (
        "import torch, walt\n"
        "from walt.ops import window_attention, add_noise\n"
        "q, k, v = (torch.randn(1, 3, 9, 9, 2, 32, device='cuda', dtype=torch.bfloat16, requires_grad=True) for _ in range(3))\n"
        "b = torch.randn(2, 5, 7, 7, device='cuda', requires_grad=True)\n"
        "window_attention(q, k, v, (3, 4, 4), rel_pos_bias=b).sum().backward()\n"
        "add_noise(torch.randn(2, 3, 5, 7, device='cuda'), torch.tensor([3, 900], device='cuda'),"
        " torch.linspace(0.99, 0.0, 1000, device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    res = subprocess.run(
        ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", sys.executable, "-c", script],
        capture_output=True, text=True, env={**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
