"""Fused window attention vs the unfused path (pad + partition + SDPA + reverse).

Both contenders get q, k, v as views of one fused qkv tensor, as a transformer block makes
them, and are timed in the same process (bench/common.compare). GFLOP/s counts attended keys
only: forward 4 * N_keys * d per query and head (QK^T and PV), backward 2.5x forward.

    python bench/attention.py [--device cpu|cuda] [--dtype float32] [--bias] [--json PATH]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, environment, print_table, sgemm_peak_gflops, write_json  # noqa: E402

import walt  # noqa: E402,F401
from walt.ops import window_attention  # noqa: E402
from walt.ops.reference import clamp_window, window_attention_sdpa  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def attended_pairs(size, window):
    """sum over queries of the number of keys each attends to (partial windows included)."""
    total = 1
    for s, w in zip(size, clamp_window(window, size)):
        full, rest = divmod(s, w)
        total *= full * w * w + rest * rest  # per axis: sum over windows of extent^2
    return total


def run(shape, window, dtype, device, use_bias, repeat):
    B, T, H, W, heads, d = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(B, T, H, W, 3, heads, d, generator=gen).to(device=device, dtype=dtype)
    bias = None
    if use_bias:
        bias = (0.1 * torch.randn(heads, *(2 * w - 1 for w in window), generator=gen)).to(device=device, dtype=dtype)
    grad = torch.randn(B, T, H, W, heads, d, generator=gen).to(device=device, dtype=dtype)

    def inputs(requires_grad):
        x = qkv.detach().requires_grad_(requires_grad)
        b = None if bias is None else bias.detach().requires_grad_(requires_grad)
        q, k, v = x.unbind(4)
        return q, k, v, b

    def fwd(fn):
        def f():
            with torch.no_grad():
                q, k, v, b = inputs(False)
                fn(q, k, v, window, rel_pos_bias=b)
        return f

    def fwd_bwd(fn):
        def f():
            q, k, v, b = inputs(True)
            fn(q, k, v, window, rel_pos_bias=b).backward(grad)
        return f

    fused_fwd, base_fwd = compare(fwd(window_attention), fwd(window_attention_sdpa), device, repeat=repeat)
    fused_fb, base_fb = compare(fwd_bwd(window_attention), fwd_bwd(window_attention_sdpa), device, repeat=repeat)
    flops_fwd = 4.0 * attended_pairs((T, H, W), window) * B * heads * d
    flops_fb = 3.5 * flops_fwd  # forward + backward (2.5x forward)
    return {
        "shape": "x".join(map(str, shape)),
        "window": "x".join(map(str, window)),
        "bias": use_bias,
        "fwd_fused_ms": fused_fwd * 1e3,
        "fwd_sdpa_ms": base_fwd * 1e3,
        "fwd_ratio": base_fwd / fused_fwd,
        "fwd_gflops": flops_fwd / fused_fwd / 1e9,
        "fb_fused_ms": fused_fb * 1e3,
        "fb_sdpa_ms": base_fb * 1e3,
        "fb_ratio": base_fb / fused_fb,
        "fb_gflops": flops_fb / fused_fb / 1e9,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--grid", type=int, nargs=3, default=(5, 16, 16), metavar=("T", "H", "W"))
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--bias", action="store_true", help="also use a relative position bias table (with gradient)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "attention.json"))
    args = p.parse_args()

    dtype = DTYPES[args.dtype]
    shape = (args.batch, *args.grid, args.heads, args.head_dim)
    peak = sgemm_peak_gflops(args.device)
    rows = [run(shape, w, dtype, args.device, args.bias, args.repeat) for w in ((5, 8, 8), (1, 16, 16))]
    env = environment(args.device)
    print(f"window attention, {args.dtype}, {args.device} ({env['device']}, {env['threads']} threads); "
          f"sgemm peak {peak:.0f} GFLOP/s; ratio = sdpa / fused")
    print_table(rows, ["shape", "window", "bias", "fwd_fused_ms", "fwd_sdpa_ms", "fwd_ratio", "fwd_gflops",
                       "fb_fused_ms", "fb_sdpa_ms", "fb_ratio", "fb_gflops"])
    write_json(args.json, {"benchmark": "window_attention", "dtype": args.dtype, "sgemm_peak_gflops": peak,
                           "environment": env, "results": rows})


if __name__ == "__main__":
    main()
