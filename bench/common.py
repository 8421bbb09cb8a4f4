"""Shared timing and reporting for walt's benchmarks.

Every benchmark measures the fused op and the baseline a user would otherwise write in the same
process, interleaved, and reports medians and their ratio. Results go to a table on stdout and
to JSON (bench/out/ by default).
"""
import json
import os
import platform
import statistics
import time

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device="cpu", warmup=2, repeat=10, min_seconds=0.0):
    """Median wall time of fn() in seconds, after warmup calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(fused, baseline, device="cpu", warmup=2, repeat=10, rounds=3):
    """(fused median, baseline median) measured in alternating rounds so drift hits both."""
    f, b = [], []
    for _ in range(rounds):
        f.append(median_time(fused, device, warmup, repeat))
        b.append(median_time(baseline, device, warmup, repeat))
    return min(f), min(b)


def sgemm_peak_gflops(device="cpu", n=1024, dtype=torch.float32):
    """Measured matmul throughput: the ceiling a GFLOP/s figure is read against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, device, warmup=3, repeat=10)
    return 2 * n**3 / t / 1e9


def environment(device="cpu"):
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch.device(device).type == "cuda":
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = platform.processor() or platform.machine()
    return env


def print_table(rows, columns):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return "" if x is None else str(x)


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
