"""walt-data: generate the procedural world, inspect a generated dataset, draw a contact sheet.

    walt-data generate --out data/world --train 1000 --val 200 --test 200
    walt-data info data/world
    walt-data sheet --out docs/world_contact_sheet.png                 # renders fresh clips
    walt-data sheet --root data/world --split val --out sheet.png      # from a generated dataset
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import click

from walt.data.world import LABEL_NAMES, WorldConfig, render_clip


def _world_options(f):
    opts = [
        click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
                     help="dataset seed; clip i of split s depends only on it"),
        click.option("--frames", default=17, show_default=True, type=click.IntRange(min=1),
                     help="frames per clip: 1 + a multiple of 4 (1, 5, 9, 17, ...)"),
        click.option("--size", default=64, show_default=True, type=click.IntRange(min=8),
                     help="frame height and width in pixels, a multiple of 8"),
        click.option("--track-points", default=64, show_default=True, type=click.IntRange(min=1),
                     help="point tracks per clip"),
        click.option("--textures", type=click.Choice(["auto", "procedural", "fashion"]), default="auto",
                     show_default=True, help="object textures; fashion needs the dataset-fashion-mnist package"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _world(seed, frames, size, track_points, textures) -> WorldConfig:
    return WorldConfig(seed=seed, frames=frames, height=size, width=size, track_points=track_points,
                       textures=textures).resolved()


@click.group()
def main():
    """Data for walt: a procedural 3D world with ground truth for every probe task."""


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="dataset directory (resumed if it exists)")
@click.option("--train", "n_train", default=1000, show_default=True, type=click.IntRange(min=0))
@click.option("--val", "n_val", default=200, show_default=True, type=click.IntRange(min=0))
@click.option("--test", "n_test", default=200, show_default=True, type=click.IntRange(min=0))
@click.option("--shard-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="clips per HDF5 shard (the unit of resuming)")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="rendering processes (0 or 1: render in this process)")
@click.option("--dry-run", is_flag=True, help="print the resolved config and exit")
@_world_options
def generate(out, n_train, n_val, n_test, shard_size, workers, dry_run, **world):
    """Render train/val/test clips into HDF5 shards with a manifest."""
    from walt.data.store import StoreWriteError, validate
    from walt.data.store import generate as run

    sizes = {"train": n_train, "val": n_val, "test": n_test}
    try:  # every argument, before anything is written
        cfg = _world(**world)
        validate(cfg, sizes, shard_size, workers)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    resolved = {"out": out, "world": dataclasses.asdict(cfg), "sizes": sizes, "shard_size": shard_size, "workers": workers}
    if dry_run:
        click.echo(json.dumps(resolved, indent=1))
        return
    start = time.perf_counter()
    try:
        run(out, cfg, sizes, shard_size=shard_size, workers=workers, progress=sys.stderr.isatty())
    except StoreWriteError as e:
        raise click.ClickException(f"{e}; the shards finished so far are kept: free space (or fix the file system) "
                                   f"and rerun the same command to continue.") from None
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    n = sum(sizes.values())
    secs = time.perf_counter() - start
    click.echo(f"{out}: {n} clips ready ({secs:.1f} s this run)")


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False))
def info(root):
    """Split sizes and label counts of a generated dataset."""
    import numpy as np

    from walt.data.store import WorldStore, read_manifest

    manifest = read_manifest(root)
    click.echo(json.dumps(manifest["config"]))
    for split in manifest["splits"]:
        try:
            store = WorldStore(root, split)
        except ValueError as e:
            click.echo(f"{split}: {e}")
            continue
        labels = np.concatenate([store._file(name)["labels"][:] for name, _ in store._shards])
        counts = {task: np.bincount(labels[:, k], minlength=len(LABEL_NAMES[task])).tolist()
                  for k, task in enumerate(LABEL_NAMES)}
        click.echo(f"{split}: {len(store)} clips; label counts {counts}")


@main.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write")
@click.option("--root", type=click.Path(exists=True, file_okay=False), help="read clips from this dataset instead of rendering")
@click.option("--split", default="val", show_default=True)
@click.option("--clips", default=4, show_default=True)
@click.option("--first", default=0, show_default=True, help="index of the first clip")
@_world_options
def sheet(out, root, split, clips, first, **world):
    """Contact sheet: frames with boxes and point tracks, and depth with mask outlines."""
    from walt.data.sheet import contact_sheet

    if root:
        from walt.data.store import WorldStore

        store = WorldStore(root, split)
        items = [store.load(i) for i in range(first, min(first + clips, len(store)))]
    else:
        cfg = _world(**world)
        items = [render_clip(cfg, split, i) for i in range(first, first + clips)]
    titles = [f"{split} #{first + n}: " + " / ".join(LABEL_NAMES[t][int(v)] for t, v in zip(LABEL_NAMES, c["labels"]))
              for n, c in enumerate(items)]
    click.echo(contact_sheet(items, titles, out))


if __name__ == "__main__":
    main()
