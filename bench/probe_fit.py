"""Probe fitting: a grid of learning rates trained together against one readout alone.

    python bench/probe_fit.py [--tasks object,depth] [--clips 256] [--latent-frames 17] [--epochs 1]
                              [--threads N] [--json PATH]

Features shaped like a small study (N clips x T' latent frames x 8 x 8 x 64, float16; 17 input
frames of 64 x 64), random, with targets of the right shapes. Both sides run the whole of
``probes.fit.fit`` (training, then prediction and metrics on val and test) in the same process,
alternating, and the best of ``--rounds`` is kept. Goal: the grid of 4 costs at most 1.5x one.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

from probes.fit import fit  # noqa: E402

GOAL = 1.5


def make_split(n, latent_frames, seed, size=64, frames=17, channels=64):
    rng = np.random.default_rng(seed)
    fi = np.arange(frames) if latent_frames == frames else np.linspace(0, frames - 1, latent_frames).round().astype(int)
    return {
        "features": rng.normal(size=(n, latent_frames, 8, 8, channels)).astype(np.float16),
        "frame_index": fi,
        "labels": {"object": rng.integers(0, 6, n)},
        "label_names": {"object": [str(i) for i in range(6)]},
        "depth": rng.uniform(0.5, 9.0, (n, frames, size, size)).astype(np.float32),
    }


def timed_fit(task, splits, lrs, epochs, batch_size):
    t0 = time.perf_counter()
    fit(task, *splits, lrs=lrs, seeds=(0,), epochs=epochs, batch_size=batch_size, progress=False)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="object,depth")
    p.add_argument("--clips", type=int, default=256)
    p.add_argument("--eval-clips", type=int, default=64)
    p.add_argument("--latent-frames", type=int, default=17)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default="bench/out/probe_fit.json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    splits = [make_split(n, a.latent_frames, s) for n, s in ((a.clips, 0), (a.eval_clips, 1), (a.eval_clips, 2))]
    grid = (1e-4, 3e-4, 1e-3, 3e-3)
    rows = []
    for task in a.tasks.split(","):
        one, four = [], []
        for _ in range(a.rounds):
            one.append(timed_fit(task, splits, grid[2:3], a.epochs, a.batch_size))
            four.append(timed_fit(task, splits, grid, a.epochs, a.batch_size))
        rows.append({"task": task, "clips": a.clips, "latent_frames": a.latent_frames, "epochs": a.epochs,
                     "one_s": min(one), "grid4_s": min(four), "ratio": min(four) / min(one),
                     "goal": f"<= {GOAL}"})
        common.print_table(rows[-1:], list(rows[-1]))
    common.write_json(a.json, {"env": common.environment(), "rows": rows})


if __name__ == "__main__":
    main()
