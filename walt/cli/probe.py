"""walt-probe: dump frozen features of WALT runs, look at them, fit probes on them, run the study.

    walt-probe dump --run runs/vwalt --data data/world --split test --blocks 2,3 --t 0,200 --out feats/v.h5
    walt-probe dump --run random:runs/vwalt ...        # untrained control (initial weights)
    walt-probe dump --run latents:runs/vwalt ...       # autoencoder-latent control
    torchrun --nproc_per_node 2 -m walt.cli.probe -- dump ...  # one shard per rank, joined into --out
    walt-probe pca --features feats/v.h5 --features feats/i.h5 --key t0200/b02 --clips 0,1 --out pca.png --gif pca.gif
    walt-probe fit --train f/train.h5 --val f/val.h5 --test f/test.h5 --key t0200/b02 --out probes/v
    walt-probe eval --readouts probes/v --features other.h5 --key t0200/b02
    walt-probe study [--preset quick] [--out study]      # the whole V-WALT vs I-WALT study

Blocks are 0-based everywhere in walt (the paper's "l = 11-16" are blocks 10-15). Under torchrun,
the `--` before the command keeps torchrun's own parser away from the command's options (it would
refuse --run as an ambiguous abbreviation of its --run-path).
"""
from __future__ import annotations

import os
import re
import sys

import click

from walt.features.dump import FORMATS


def parse_ints(text: str, what: str) -> list[int]:
    """'2,3' or '10-15' (or both, '0,10-12') -> sorted unique ints; one sentence otherwise."""
    out = set()
    try:
        for part in str(text).split(","):
            m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
            if m and int(m.group(2)) >= int(m.group(1)):
                out.update(range(int(m.group(1)), int(m.group(2)) + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise click.UsageError(f"{what} expects comma-separated integers or ranges like 2,3 or 10-15, got {text!r}.") from None
    return sorted(out)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Features of WALT runs: dump them to HDF5, visualise them, fit and evaluate probes on them, and
    run the whole V-WALT vs I-WALT study."""


# ----------------------------------------------------------------------------- dump
@main.command()
@click.option("--run", "run_spec", required=True, metavar="RUN",
              help="A diffusion run directory (EMA weights), random:RUN (its initial weights, the untrained control) "
                   "or latents:RUN (its autoencoder latents, the latent control).")
@click.option("--data", required=True, metavar="DATA",
              help="A `walt-data` store directory, a TAP-Vid .pkl, a .csv of labelled videos (paths relative to it), "
                   "a folder of class folders of images, or an RGB-D sequence (Images/, Depth/, CameraPose/).")
@click.option("--format", "fmt", type=click.Choice(("auto",) + FORMATS), default="auto", show_default=True,
              help="Format of DATA (auto: detected from it).")
@click.option("--split", default=None, help="Split of a `walt-data` store [default: test].")
@click.option("--blocks", default=None, metavar="LIST",
              help="Blocks to tap, 0-based (the paper's l = 11-16 are blocks 10-15): e.g. 2,3 or 10-15.")
@click.option("--t", "timesteps", default=None, metavar="LIST",
              help="Timesteps in [0, 999], e.g. 0,200 (t = 0: the schedule's first index, practically clean).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Feature file to write (resumed if it exists).")
@click.option("--batch-size", default=8, show_default=True, help="Clips loaded and written together (features do not depend on it).")
@click.option("--seed", default=0, show_default=True, help="Noise seed (a clip's noise is keyed by its index in DATA).")
@click.option("--step", type=int, default=None, help="Use the run's EMA snapshot kept at this training step.")
@click.option("--limit", type=int, default=None, help="Dump only the first N clips.")
@click.option("--autoencoder", default=None, type=click.Path(file_okay=False),
              help="The autoencoder run, when it is no longer where RUN's config says.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", default=0, show_default=True, help="DataLoader processes decoding clips.")
@click.option("--video/--no-video", "store_video", default=True, show_default=True,
              help="Store a uint8 copy of the clips as the model saw them (for `walt-probe pca`).")
def dump(run_spec, data, fmt, split, blocks, timesteps, out, batch_size, seed, step, limit, autoencoder, device,
         workers, store_video):
    """Dump features of RUN on DATA: the outputs of --blocks at timesteps --t, one forward pass per
    clip and timestep, with the clip's noise keyed by its index in DATA.

    \b
    walt-probe dump --run runs/vwalt --data data/world --blocks 2,3 --t 0,200 --out feats.h5
    torchrun --nproc_per_node 2 -m walt.cli.probe -- dump ...   # note the --
    """
    import torch

    from walt.features import dump as D
    from walt.features.h5 import FeatureFileError, FeatureWriteError

    kind, _ = D.parse_run(run_spec)
    if kind != "latents":
        if blocks is None or timesteps is None:
            raise click.UsageError("--blocks and --t are required (except for a latents:RUN control).")
    elif blocks is not None or timesteps is not None:
        click.echo("note: latents:RUN stores the autoencoder latents; --blocks and --t are ignored.", err=True)
        blocks = timesteps = None
    block_list = parse_ints(blocks, "--blocks") if blocks is not None else []
    t_list = parse_ints(timesteps, "--t") if timesteps is not None else []
    for name, value, low in (("--batch-size", batch_size, 1), ("--limit", limit, 1), ("--workers", workers, 0),
                             ("--step", step, 0)):
        if value is not None and value < low:
            raise click.UsageError(f"{name} must be at least {low}, got {value}.")
    if not 0 <= seed < 2**64:
        raise click.UsageError(f"--seed must be in [0, 2**64), got {seed}.")

    from walt.train import distributed

    try:
        dist = distributed.setup("cpu" if device == "cpu" else device)
    except (RuntimeError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    try:
        backbone, attrs, size = D.load_backbone(run_spec, block_list, t_list, seed=seed, step=step, device=dist.device,
                                                autoencoder=autoencoder)
        source, fmt_used, split_used = D.open_source(data, None if fmt == "auto" else fmt, split, frames=size[0])
        clips = D.PreparedClips(source, size, limit)
        if len(clips) == 0:
            raise ValueError(f"{data} holds no clips.")
        clips[0]  # unreadable or unsuitable data fails here, before anything is written
        attrs.update(data=os.path.abspath(data), data_format=fmt_used, split=split_used)
        if os.path.dirname(os.path.abspath(out)):
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        path = D.dump(out, backbone, clips, attrs, batch_size=batch_size, store_video=store_video,
                      progress=sys.stderr.isatty(), rank=dist.rank, world=dist.world, num_workers=workers,
                      barrier=distributed.barrier if dist.enabled else None)
    except (FileNotFoundError, ValueError, KeyError, FeatureFileError, FeatureWriteError) as e:
        raise click.ClickException(e.args[0] if isinstance(e, KeyError) else str(e)) from None
    except OSError as e:
        raise click.ClickException(f"{getattr(e, 'filename', None) or data}: {e.strerror or e}.") from None
    finally:
        distributed.teardown()
    if dist.main:
        click.echo(f"{path}: {len(clips)} clips, features {backbone.keys}, video {'x'.join(map(str, clips.video_size))}"
                   f" (torch threads {torch.get_num_threads()})")


# ----------------------------------------------------------------------------- pca
def pca_rgb(tokens):
    """(T', h, w, C) features -> (T', h, w, 3) in [0, 1]: the first three principal components of
    all the clip's tokens, each stretched over its 1st-99th percentile. Signs are fixed so that
    each component's largest loading is positive."""
    import numpy as np

    T, h, w, C = tokens.shape
    X = tokens.reshape(-1, C).astype(np.float64)
    X = X - X.mean(0)
    _, _, Vt = np.linalg.svd(X, full_matrices=False)
    comps = Vt[:3]
    comps = comps * np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])[:, None]
    P = X @ comps.T
    if P.shape[1] < 3:
        P = np.concatenate([P, np.zeros((len(P), 3 - P.shape[1]))], 1)
    lo, hi = np.percentile(P, 1, axis=0), np.percentile(P, 99, axis=0)
    P = np.clip((P - lo) / np.where(hi > lo, hi - lo, 1.0), 0, 1)
    return P.reshape(T, h, w, 3)


def _upsample(img, H, W):
    import numpy as np

    h, w = img.shape[:2]
    return np.repeat(np.repeat(img, -(-H // h), 0), -(-W // w), 1)[:H, :W]


@main.command()
@click.option("--features", "paths", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Feature file(s); give two (e.g. V-WALT and I-WALT) to show them side by side.")
@click.option("--key", required=True, help="Feature to show, e.g. t0200/b02 (0-based block) or latent.")
@click.option("--clips", default="0", show_default=True, help="Clip indices in the files, e.g. 0,1.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG grid to write.")
@click.option("--gif", default=None, type=click.Path(dir_okay=False), help="Also write an animated GIF.")
@click.option("--zoom", default=0, help="Pixel zoom of frames (0: to at least 128 pixels high).")
def pca(paths, key, clips, out, gif, zoom):
    """The first three PCA components of a block's tokens as RGB, next to the input frames.

    PCA is fitted per clip over all its tokens, and for each file separately. Columns are the input
    frames the coarsest file's latent frames stand for; each row shows the latent frame that
    covers that input frame. The input frames come from the first file (stored by `dump`).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from walt.features.h5 import FeatureFile, FeatureFileError

    if len(paths) > 2:
        raise click.UsageError(f"--features takes one or two files, got {len(paths)}.")
    index = parse_ints(clips, "--clips")
    try:
        files = [FeatureFile(p) for p in paths]
        for ff in files:
            ff.shape(key)
            if index[-1] >= len(ff):
                raise FeatureFileError(f"{ff.path} has {len(ff)} clips; --clips asks for clip {index[-1]}.")
        video = files[0].video(index)
        for ff in files[1:]:
            if tuple(ff.attrs["video_size"]) != tuple(files[0].attrs["video_size"]) or \
                    ff.attrs.get("data") != files[0].attrs.get("data") or \
                    not np.array_equal(ff.clip_index[index], files[0].clip_index[index]):
                raise FeatureFileError(f"{ff.path} and {files[0].path} hold different clips; compare dumps of the same data.")
        maps = [[pca_rgb(ff.features(key, [i])[0]) for i in index] for ff in files]
    except FeatureFileError as e:
        raise click.ClickException(str(e)) from None
    T, H, W = video.shape[1:4]
    z = zoom or max(1, -(-128 // H))
    fidx = [ff.frame_index for ff in files]
    cols = min(fidx, key=len).tolist()
    names = [f"{ff.attrs['kind']}/{ff.attrs['mode']}" for ff in files]
    label_w = 90

    def cover(fi, f):  # the latent frame that stands for input frame f
        return int(min(np.searchsorted(fi, f, side="left"), len(fi) - 1))

    def tile(c, f, r):  # r = -1: input frame; else PCA row of file r
        img = video[c, f] if r < 0 else (_upsample(maps[r][c][cover(fidx[r], f)], H, W) * 255).astype(np.uint8)
        return np.repeat(np.repeat(img, z, 0), z, 1)

    def rows_image(c, frames):
        rows = [np.concatenate([tile(c, f, r) for f in frames], 1) for r in range(-1, len(files))]
        grid = np.concatenate(rows, 0)
        canvas = Image.new("RGB", (grid.shape[1] + label_w, grid.shape[0]), "white")
        canvas.paste(Image.fromarray(grid), (label_w, 0))
        draw = ImageDraw.Draw(canvas)
        for r, name in enumerate([f"clip {index[c]}"] + names):
            draw.text((4, r * H * z + 4), name, fill="black")
        return canvas

    panels = [rows_image(c, cols) for c in range(len(index))]
    sheet = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height
    try:
        sheet.save(out)
        if gif:
            frames = []
            for f in range(T):
                ps = [rows_image(c, [f]) for c in range(len(index))]
                im = Image.new("RGB", (max(p.width for p in ps), sum(p.height for p in ps)), "white")
                y = 0
                for p in ps:
                    im.paste(p, (0, y))
                    y += p.height
                frames.append(im)
            frames[0].save(gif, save_all=True, append_images=frames[1:], duration=150, loop=0)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot write {gif if gif and os.path.exists(out) else out} ({e}).") from None
    click.echo(f"{out}{' and ' + gif if gif else ''}: PCA of {key} for clips {index} of {', '.join(paths)}")



# ----------------------------------------------------------------------------- fit / eval
def _splits_of(train, val, test, key, stream):
    from probes.features import FeatureSplit, load_split

    read = (lambda p: FeatureSplit(p, key)) if stream else (lambda p: load_split(p, key))
    return [read(p) for p in (train, val, test)]


def _device(text):
    """--device of fit and eval as a torch.device, or a usage error in one sentence."""
    from probes.fit import resolve_device

    try:
        return resolve_device(text)
    except ValueError as e:
        raise click.UsageError(f"--device: {e}.") from None


def _floats(text, what):
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise click.UsageError(f"{what} expects comma-separated numbers, got {text!r}.") from None


@main.command()
@click.option("--train", "train_path", required=True, type=click.Path(dir_okay=False), help="Features of the training clips.")
@click.option("--val", "val_path", required=True, type=click.Path(dir_okay=False), help="Features of the validation clips (choose the lr).")
@click.option("--test", "test_path", required=True, type=click.Path(dir_okay=False), help="Features of the test clips (report).")
@click.option("--key", required=True, help="Feature to read, e.g. t0200/b02 (0-based block) or latent.")
@click.option("--tasks", default="all", show_default=True,
              help="Comma-separated tasks (object, scene, texture, appearance, motion, depth, camera_pose, "
                   "point_tracking, box_tracking), or all: every task the files have labels or annotations for.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for <task>.json and <task>.safetensors.")
@click.option("--lrs", default="1e-4,3e-4,1e-3,3e-3", show_default=True, help="Learning rates trained together.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Readout seeds trained together.")
@click.option("--epochs", default=20, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--width", default=64, show_default=True, help="Readout width.")
@click.option("--stream", is_flag=True, help="Read features from the files per batch instead of loading them into memory.")
@click.option("--device", default="auto", show_default=True,
              help="Where the readouts train: auto (a GPU when there is one), cpu, cuda or cuda:N.")
def fit(train_path, val_path, test_path, key, tasks, out, lrs, seeds, epochs, batch_size, width, stream, device):
    """Fit readouts on cached features: a grid of learning rates x seeds in one pass over the
    data, the best lr chosen on --val, every metric reported on --test.

    \b
    walt-probe fit --train f/train.h5 --val f/val.h5 --test f/test.h5 --key t0200/b02 --out probes/v
    """
    import json

    from probes.features import FeatureSplit
    from probes.fit import fit as fit_grid
    from probes.tasks import TASKS, get_task
    from walt.features.h5 import FeatureFile, FeatureFileError
    from walt.runs import sha256

    lr_list = _floats(lrs, "--lrs")
    seed_list = parse_ints(seeds, "--seeds")
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--width", width)):
        if value < 1:
            raise click.UsageError(f"{name} must be at least 1, got {value}.")
    if not lr_list or any(lr <= 0 for lr in lr_list):
        raise click.UsageError(f"--lrs must be positive learning rates, got {lrs!r}.")
    device = _device(device)
    try:
        probe = FeatureSplit(train_path, key)
        with FeatureFile(val_path) as v, FeatureFile(test_path) as t:
            for ff in (v, t):  # the three splits must come from the same model and feature
                ff.check({k: probe.file.attrs[k] for k in ("kind", "mode", "checkpoint_sha256", "config")})
                ff.shape(key)
        names = list(TASKS) if tasks == "all" else [x.strip() for x in tasks.split(",") if x.strip()]
        chosen = []
        for name in names:
            task = get_task(name)
            why = task.missing({**probe.get_batch([0]), "frame_index": probe.frame_index})
            if why and tasks != "all":
                raise click.ClickException(f"{why} in {train_path}.")
            if not why:
                chosen.append(task)
        if not chosen:
            raise click.ClickException(f"{train_path} has the labels or annotations of no task in {names}.")
        splits = _splits_of(train_path, val_path, test_path, key, stream)
    except (FeatureFileError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    os.makedirs(out, exist_ok=True)
    attrs = probe.file.attrs
    source = {"train": os.path.abspath(train_path), "val": os.path.abspath(val_path), "test": os.path.abspath(test_path),
              "train_sha256": sha256(train_path), "val_sha256": sha256(val_path), "test_sha256": sha256(test_path),
              "key": key, "model": {k: attrs.get(k) for k in ("run", "kind", "mode", "step", "checkpoint_sha256")}}
    for task in chosen:
        result = fit_grid(task, *splits, lrs=lr_list, seeds=seed_list, epochs=epochs, batch_size=batch_size,
                          width=width, progress=sys.stderr.isatty(), return_readout=True, device=device)
        readout = result.pop("readout")
        result["features"] = source
        _save_readout(os.path.join(out, f"{task.name}.safetensors"), readout, result, width)
        with open(os.path.join(out, f"{task.name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        p = task.primary
        click.echo(f"{task.name}: test {p} {result['test']['mean'][p]:.4f} ± {result['test']['std'][p]:.4f} "
                   f"(lr {sorted(set(result['chosen_lr'].values()))}, seeds {seed_list}) -> {out}/{task.name}.json")


def _save_readout(path, readout, result, width):
    """The fitted group's weights, with what is needed to rebuild it and which member each seed chose."""
    import json

    from walt.train.checkpoint import export_safetensors

    members = [(lr, s) for lr in result["lrs"] for s in result["seeds"]]
    chosen = {s: members.index((result["chosen_lr"][s], int(s))) for s in result["chosen_lr"]}
    export_safetensors(path, readout, {"task": result["task"], "spec": json.dumps(result["spec"]), "width": str(width),
                                       "members": json.dumps(members), "chosen": json.dumps(chosen)})


@main.command("eval")
@click.option("--readouts", required=True, type=click.Path(file_okay=False), help="A `walt-probe fit` output directory.")
@click.option("--features", "path", required=True, type=click.Path(dir_okay=False), help="Features to evaluate on.")
@click.option("--key", required=True, help="Feature to read (as fitted), e.g. t0200/b02.")
@click.option("--tasks", default="all", show_default=True, help="Comma-separated tasks, or all fitted ones.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Results JSON (default: print only).")
@click.option("--device", default="auto", show_default=True, help="Where the readouts run: auto, cpu, cuda or cuda:N.")
def eval_(readouts, path, key, tasks, out, device):
    """Evaluate fitted readouts (each seed's chosen learning rate) on another feature file."""
    import json

    import numpy as np
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from probes.features import load_split
    from probes.fit import predict
    from probes.tasks import get_task
    from walt.features.h5 import FeatureFileError

    device = _device(device)

    names = sorted(f[:-len(".safetensors")] for f in os.listdir(readouts) if f.endswith(".safetensors")) \
        if os.path.isdir(readouts) else []
    if tasks != "all":
        wanted = [x.strip() for x in tasks.split(",") if x.strip()]
        missing = [t for t in wanted if t not in names]
        if missing:
            raise click.ClickException(f"{readouts} holds no fitted readout for {missing}; it has {names or 'none'}.")
        names = wanted
    if not names:
        raise click.ClickException(f"{readouts} holds no fitted readouts (<task>.safetensors from `walt-probe fit`).")
    try:
        data = load_split(path, key)
    except (FeatureFileError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    results = {}
    for name in names:
        task = get_task(name)
        file = os.path.join(readouts, f"{name}.safetensors")
        with safe_open(file, "pt") as f:
            meta = f.metadata()
        spec, members, chosen = (json.loads(meta[k]) for k in ("spec", "members", "chosen"))
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        why = task.missing(data)
        if why:
            raise click.ClickException(f"{why} in {path}.")
        readout = task.build(spec, width=int(meta["width"]), seeds=[s for _, s in members])
        readout.load_state_dict(load_file(file))
        readout.to(device)
        with torch.no_grad():
            outs, targets = predict(task, readout, data, spec)
        per_seed = {}
        for s, g in chosen.items():
            member = tuple(o[g] for o in outs) if isinstance(outs, tuple) else outs[g]
            per_seed[s] = task.score(task.metrics(member, targets, spec))
        mean = {k: float(np.mean([v[k] for v in per_seed.values()])) for k in next(iter(per_seed.values()))}
        results[name] = {"per_seed": per_seed, "mean": mean, "features": os.path.abspath(path), "key": key}
        click.echo(f"{name}: {task.primary} {mean[task.primary]:.4f} on {path}")
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


# ----------------------------------------------------------------------------- study
@main.command()
@click.option("--preset", default="quick", show_default=True, help="quick (2-core CPU, under 30 min) or gpu (hours).")
@click.option("--out", default="study", show_default=True, type=click.Path(file_okay=False), help="Study directory.")
def study(preset, out):
    """The whole study on the built-in world: data -> autoencoder -> I-WALT and V-WALT (same budget)
    -> features (+ untrained and latent controls) -> readouts for every task -> OUT/report.md.

    Every stage is skipped when its outputs exist, so an interrupted study resumes where it stopped.
    """
    import logging

    from walt.study import PRESETS, Study

    if preset not in PRESETS:
        raise click.UsageError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("walt.study")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        report = Study(out, PRESETS[preset]).run()
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report: {report}")


if __name__ == "__main__":
    main()
