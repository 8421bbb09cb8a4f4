"""Noise injection: walt.ops.add_noise (Philox eps, x_t and v in one pass) against what a user would
otherwise write, torch.randn_like + the arithmetic for x_t and v, measured in the same process.

    python bench/noise.py [--device cpu|cuda] [--threads N] [--json PATH]

Effective bandwidth counts the bytes the op must move (read x0, write x_t and v) and is read
against a measured copy (x.clone()) of the same tensor. Acceptance: >= 3x on (8, 8, 5, 32, 32)
float32 (the WALT latent of 8 clips of 17 frames at 256x256).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import walt  # noqa: E402,F401
from walt.diffusion import make_schedule  # noqa: E402
from walt.ops import add_noise  # noqa: E402

SHAPES = [(8, 8, 5, 32, 32), (16, 8, 5, 64, 64)]
ACCEPT_SHAPE, ACCEPT_RATIO = (8, 8, 5, 32, 32), 3.0


def baseline(x0, t, ac):
    ab = ac[t].reshape(-1, *([1] * (x0.dim() - 1)))
    a, s = ab.sqrt(), (1 - ab).sqrt()
    eps = torch.randn_like(x0)
    return a * x0 + s * eps, a * eps - s * x0


def bench_shape(shape, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g, dtype=dtype).to(device)
    t = torch.randint(0, 1000, (shape[0],), generator=g).to(device)
    ac = make_schedule().to(device=device, dtype=torch.float32)
    fused_s, base_s = common.compare(
        lambda: add_noise(x0, t, ac, seed=1), lambda: baseline(x0, t, ac), device, repeat=20, rounds=5
    )
    copy_s = common.median_time(lambda: x0.clone(), device, warmup=3, repeat=20)
    nbytes = x0.numel() * x0.element_size()
    copy_gbs = 2 * nbytes / copy_s / 1e9
    fused_gbs = 3 * nbytes / fused_s / 1e9  # read x0, write x_t and v
    return {
        "shape": "x".join(map(str, shape)),
        "dtype": str(dtype).replace("torch.", ""),
        "fused_ms": fused_s * 1e3,
        "baseline_ms": base_s * 1e3,
        "speedup": base_s / fused_s,
        "fused_GB/s": fused_gbs,
        "baseline_GB/s": 3 * nbytes / base_s / 1e9,
        "copy_GB/s": copy_gbs,
        "fused/copy": fused_gbs / copy_gbs,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "noise.json"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench/noise.py: --device cuda needs a CUDA device; none is available.")
        if not torch._C._dispatch_has_kernel_for_dispatch_key("walt::add_noise", "CUDA"):
            sys.exit("bench/noise.py: walt._C was built without a CUDA kernel for walt::add_noise.")

    rows = [bench_shape(shape, args.device) for shape in SHAPES]
    columns = ["shape", "dtype", "fused_ms", "baseline_ms", "speedup", "fused_GB/s", "copy_GB/s", "fused/copy"]
    env = common.environment(args.device)
    # Other work on the machine shows up as implausible copy bandwidth; the load says how much.
    env["loadavg_1min"] = os.getloadavg()[0]
    print(f"add_noise vs randn_like + arithmetic on {env['device']} ({env['threads']} threads, "
          f"load average {env['loadavg_1min']:.2f} on {os.cpu_count()} CPUs), target v")
    common.print_table(rows, columns)
    accept = next(r for r in rows if r["shape"] == "x".join(map(str, ACCEPT_SHAPE)))
    passed = accept["speedup"] >= ACCEPT_RATIO
    verdict = "PASS" if passed else "FAIL"
    print(f"acceptance ({accept['shape']} float32 >= {ACCEPT_RATIO}x): {accept['speedup']:.2f}x {verdict}")
    acceptance = {"shape": accept["shape"], "min_speedup": ACCEPT_RATIO, "speedup": accept["speedup"], "passed": passed}
    common.write_json(args.json, {"bench": "noise", "env": env, "rows": rows, "acceptance": acceptance})


if __name__ == "__main__":
    main()
