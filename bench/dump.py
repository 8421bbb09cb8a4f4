"""Feature-dump throughput with writing on vs off, in the same process: what the HDF5 writer (a
process of its own, float16 features) costs a dump. Goal: with writing >= 90% of the clips/s without.

    python bench/dump.py                              # makes a tiny trained run and a world store
    python bench/dump.py --run runs/vwalt --data data/world --blocks 1,2,3 --t 0,200

Without --run/--data it builds, in a temporary folder, an autoencoder run (CPU preset, untrained)
and a V-WALT run of the CPU preset trained for a few steps on 17 x 32 x 32 clips, and a world
store of --clips test clips of that size. Rounds alternate writing on and off (5 by default:
on a shared 2-core machine single rounds vary by 10%); the best round of each is reported, with their ratio and the CPU's features (python -m walt.info).
"""
import argparse
import os
import shutil
import tempfile
import time

import torch


def make_runs(root, clips, size=32, frames=17):
    from walt.config import RunConfig, merge, resolve, to_yaml
    from walt.data.store import generate
    from walt.data.world import WorldConfig
    from walt.models import CausalVAE
    from walt.models.presets import AUTOENCODER_PRESETS
    from walt.train import checkpoint, diffusion
    from walt.train.loop import train

    ae = os.path.join(root, "ae")
    os.makedirs(ae)
    cfg = merge(RunConfig(), {"stage": "autoencoder", "autoencoder": AUTOENCODER_PRESETS["cpu"]})
    with open(os.path.join(ae, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    torch.manual_seed(0)
    vae = CausalVAE(cfg.autoencoder)
    for mode in ("video", "image"):
        vae.set_latent_stats(mode, torch.zeros(8), torch.ones(8))
    checkpoint.export_safetensors(os.path.join(ae, "model.safetensors"), vae)
    run = os.path.join(root, "vwalt")
    sets = [f"out_dir={run}", f"autoencoder_run={ae}", "train.steps=3", "train.num_samples=0", "data.num_clips=8",
            f"data.frames={frames}", f"data.size={size}", "train.log_every=10"]
    train(resolve("cpu", sets=sets, extra={"stage": "diffusion"}), diffusion.make_task)
    data = os.path.join(root, "world")
    generate(data, WorldConfig(frames=frames, height=size, width=size, track_points=32, textures="procedural"),
             {"test": clips}, workers=1, progress=False)
    return run, data


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="diffusion run (default: a tiny one made here)")
    ap.add_argument("--data", help="data for the dump (default: a world store made here)")
    ap.add_argument("--split", default=None)
    ap.add_argument("--clips", type=int, default=192)
    ap.add_argument("--blocks", default="1,2,3")
    ap.add_argument("--t", default="0,200")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("walt.train").setLevel(logging.WARNING)
    from walt.features.dump import PreparedClips, dump, load_backbone, open_source

    tmp = tempfile.mkdtemp(prefix="walt-bench-dump-")
    try:
        run, data = args.run, args.data
        if not run or not data:
            made_run, made_data = make_runs(tmp, args.clips)
            run, data = run or made_run, data or made_data
        backbone, attrs, size = load_backbone(run, [int(b) for b in args.blocks.split(",")],
                                              [int(t) for t in args.t.split(",")])
        source, fmt, split = open_source(data, None, args.split, frames=size[0])
        clips = PreparedClips(source, size, args.clips)
        attrs.update(data=os.path.abspath(data), data_format=fmt, split=split)
        out = os.path.join(tmp, "feats.h5")

        sizes = []

        def once(write):
            if os.path.exists(out):
                os.remove(out)
            start = time.perf_counter()
            dump(out, backbone, clips, attrs, batch_size=args.batch_size, write=write)
            rate = len(clips) / (time.perf_counter() - start)
            if write:
                sizes.append(os.path.getsize(out))
            return rate

        once(False)  # warm-up: first-touch allocations, page cache of the data
        on, off = [], []
        for _ in range(args.rounds):
            on.append(once(True))
            off.append(once(False))
        size_mib = sizes[-1] / 2**20
    finally:
        shutil.rmtree(tmp)
    from walt.info import info

    machine = info()
    print(f"dump of {len(clips)} clips {'x'.join(map(str, size))}, features {backbone.keys}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads; file {size_mib:.1f} MiB")
    print(f"writing on:  {max(on):.2f} clips/s (rounds {', '.join(f'{x:.2f}' for x in on)})")
    print(f"writing off: {max(off):.2f} clips/s (rounds {', '.join(f'{x:.2f}' for x in off)})")
    print(f"ratio on/off: {max(on) / max(off):.3f} (goal >= 0.90)")
    print(f"cpu_features: {machine['cpu_features']}, attention_cpu: {machine['attention_cpu']}")


if __name__ == "__main__":
    main()
