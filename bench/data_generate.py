"""Throughput of the procedural world: render N clips with every annotation and write them as
HDF5 shards, the way `walt-data generate` does, and print clips per second.

    python bench/data_generate.py                   # 1000 clips of 17 x 64 x 64, 2 workers
    python bench/data_generate.py --clips 200 --workers 1

The target on a 2-core machine is 1000 clips in under 5 minutes (> 3.3 clips/s).
"""
import argparse
import os
import shutil
import tempfile
import time

from walt.data.store import generate
from walt.data.world import WorldConfig, render_clip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--textures", default="auto")
    ap.add_argument("--out", help="keep the dataset here (default: a temporary directory, removed)")
    args = ap.parse_args()

    cfg = WorldConfig(frames=args.frames, height=args.size, width=args.size, textures=args.textures).resolved()
    start = time.perf_counter()
    for i in range(5):
        render_clip(cfg, "train", i)
    one = (time.perf_counter() - start) / 5

    out = args.out or tempfile.mkdtemp(prefix="walt-bench-")
    try:
        start = time.perf_counter()
        generate(out, cfg, {"train": args.clips}, shard_size=args.shard_size, workers=args.workers, progress=False)
        secs = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    finally:
        if not args.out:
            shutil.rmtree(out)
    print(f"render only, 1 process: {one * 1000:.0f} ms/clip ({1 / one:.1f} clips/s)")
    print(f"generate {args.clips} clips of {args.frames}x{args.size}x{args.size} ({cfg.textures} textures) "
          f"with {args.workers} workers: {secs:.1f} s = {args.clips / secs:.1f} clips/s, {size / 2**20:.0f} MiB on disk")
    print(f"1000 clips would take {1000 / (args.clips / secs) / 60:.1f} min (budget: 5 min)")


if __name__ == "__main__":
    main()
