"""Fused window attention vs the unfused path (pad + partition + SDPA + reverse).

Both contenders get q, k, v as views of one fused qkv tensor, as a transformer block makes
them, and are timed in the same process (bench/common.compare). GFLOP/s counts attended keys
only: forward 4 * N_keys * d per query and head (QK^T and PV), backward 2.5x forward.
On CUDA the baselines are partition + SDPA forced onto cuDNN and onto flash attention (each
where this GPU and torch build support it), and FlexAttention with a window block mask on the
unpartitioned token sequence; the % column is against a measured matmul peak in the same dtype.

    python bench/attention.py [--device cpu|cuda] [--dtype float32] [--bias] [--threads N] [--json PATH]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, environment, print_table, sgemm_peak_gflops, write_json  # noqa: E402

import walt  # noqa: E402,F401
from walt.ops import window_attention  # noqa: E402
from walt.ops.reference import clamp_window  # noqa: E402
from walt.ops.unfused import window_attention_sdpa  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def attended_pairs(size, window):
    """sum over queries of the number of keys each attends to (partial windows included)."""
    total = 1
    for s, w in zip(size, clamp_window(window, size)):
        full, rest = divmod(s, w)
        total *= full * w * w + rest * rest  # per axis: sum over windows of extent^2
    return total


def sdpa_on(backend):
    """window_attention_sdpa with SDPA pinned to one backend."""
    from torch.nn.attention import sdpa_kernel

    def f(q, k, v, window, rel_pos_bias=None):
        with sdpa_kernel([backend]):
            return window_attention_sdpa(q, k, v, window, rel_pos_bias=rel_pos_bias)

    return f


def flex_window_attention():
    """FlexAttention over the (B, heads, T*H*W, d) sequence, masked to windows, bias as score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def f(q, k, v, window, rel_pos_bias=None):
        B, T, H, W, heads, d = q.shape
        wt, wh, ww = clamp_window(window, (T, H, W))
        rt, rh, rw = window
        N = T * H * W

        def coords(i):
            return i // (H * W), (i // W) % H, i % W

        def same_window(b, h, qi, ki):
            (qt, qh, qw), (kt, kh, kw) = coords(qi), coords(ki)
            return (qt // wt == kt // wt) & (qh // wh == kh // wh) & (qw // ww == kw // ww)

        score_mod = None
        if rel_pos_bias is not None:
            def score_mod(score, b, h, qi, ki):
                (qt, qh, qw), (kt, kh, kw) = coords(qi), coords(ki)
                return score + rel_pos_bias[h, qt % wt - kt % wt + rt - 1, qh % wh - kh % wh + rh - 1,
                                            qw % ww - kw % ww + rw - 1]

        key = (T, H, W, window)
        if key not in masks:
            masks[key] = create_block_mask(same_window, None, None, N, N, device=q.device)
        seq = lambda x: x.reshape(B, N, heads, d).transpose(1, 2)  # noqa: E731
        o = flex(seq(q), seq(k), seq(v), score_mod=score_mod, block_mask=masks[key])
        return o.transpose(1, 2).reshape(B, T, H, W, heads, d)

    return f


def baselines(device):
    if device != "cuda":
        return {"sdpa": window_attention_sdpa}
    from torch.nn.attention import SDPBackend

    return {"sdpa_cudnn": sdpa_on(SDPBackend.CUDNN_ATTENTION), "sdpa_flash": sdpa_on(SDPBackend.FLASH_ATTENTION),
            "flex": flex_window_attention()}


def run(shape, window, dtype, device, use_bias, repeat, peak, base_name, base_fn):
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

    row = {"shape": "x".join(map(str, shape)), "window": "x".join(map(str, window)), "bias": use_bias,
           "baseline": base_name}
    try:
        fused_fwd, base_fwd = compare(fwd(window_attention), fwd(base_fn), device, repeat=repeat)
        fused_fb, base_fb = compare(fwd_bwd(window_attention), fwd_bwd(base_fn), device, repeat=repeat)
    except RuntimeError as e:  # e.g. an SDPA backend this GPU or build does not offer
        print(f"{base_name} skipped for window {window}: {str(e).splitlines()[0]}")
        return None
    flops_fwd = 4.0 * attended_pairs((T, H, W), window) * B * heads * d
    flops_fb = 3.5 * flops_fwd  # forward + backward (2.5x forward)
    return {
        **row,
        "fwd_fused_ms": fused_fwd * 1e3,
        "fwd_base_ms": base_fwd * 1e3,
        "fwd_ratio": base_fwd / fused_fwd,
        "fwd_gflops": flops_fwd / fused_fwd / 1e9,
        "fwd_%peak": 100 * flops_fwd / fused_fwd / 1e9 / peak,
        "fb_fused_ms": fused_fb * 1e3,
        "fb_base_ms": base_fb * 1e3,
        "fb_ratio": base_fb / fused_fb,
        "fb_gflops": flops_fb / fused_fb / 1e9,
        "fb_%peak": 100 * flops_fb / fused_fb / 1e9 / peak,
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
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both contenders (default: torch's)")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "attention.json"))
    args = p.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/attention.py: --device cuda needs a CUDA device, and none is available.")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    shape = (args.batch, *args.grid, args.heads, args.head_dim)
    n = 4096 if args.device == "cuda" else 1024
    # best of three: the machine may be shared
    peak = max(sgemm_peak_gflops(args.device, n=n, dtype=dtype if args.device == "cuda" else torch.float32)
               for _ in range(3))
    rows = [run(shape, w, dtype, args.device, args.bias, args.repeat, peak, name, fn)
            for w in ((5, 8, 8), (1, 16, 16)) for name, fn in baselines(args.device).items()]
    rows = [r for r in rows if r is not None]
    env = environment(args.device)
    print(f"window attention, {args.dtype}, {args.device} ({env['device']}, {env['threads']} threads); "
          f"matmul peak {peak:.0f} GFLOP/s; ratio = baseline / fused")
    print_table(rows, ["shape", "window", "bias", "baseline", "fwd_fused_ms", "fwd_base_ms", "fwd_ratio", "fwd_gflops",
                       "fwd_%peak", "fb_fused_ms", "fb_base_ms", "fb_ratio", "fb_gflops", "fb_%peak"])
    write_json(args.json, {"benchmark": "window_attention", "dtype": args.dtype, "sgemm_peak_gflops": peak,
                           "environment": env, "results": rows})


if __name__ == "__main__":
    main()
