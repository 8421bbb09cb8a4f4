"""Generate the procedural world to disk as HDF5 shards, and read it back.

Layout of a dataset directory:
    manifest.json          config, label names, and for each split its size and finished shards
    train-00000.h5 ...     `shard_size` consecutive clips each; one dataset per key of
                           `world.render_clip` with a leading clip axis, chunked one clip per chunk

Generation survives being killed: a shard is written to `<name>.tmp` and renamed when complete,
and the manifest (itself replaced atomically) lists only finished shards, so a rerun with the
same config renders only what is missing. Shards are rendered in a process pool; since every clip
depends only on (config, split, index), the result does not depend on the number of workers.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
from dataclasses import asdict

import h5py
import numpy as np

from walt.data.world import LABEL_NAMES, SPLITS, WorldConfig, render_clip

FORMAT = "walt-world/2"
_COMPRESSED = {"video", "depth", "mask"}


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.h5"


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _render_shard(config: dict, split: str, first: int, count: int, path: str) -> tuple[str, int, int]:
    cfg = WorldConfig(**config)
    clips = [render_clip(cfg, split, first + i) for i in range(count)]
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["config"] = json.dumps(config)
        f.attrs["split"], f.attrs["first"], f.attrs["count"] = split, first, count
        for key in clips[0]:
            data = np.stack([c[key] for c in clips])
            f.create_dataset(key, data=data, chunks=(1,) + data.shape[1:],
                             compression="lzf" if key in _COMPRESSED else None)
    os.replace(tmp, path)
    return split, first, count


def generate(out: str, config: WorldConfig, sizes: dict[str, int], shard_size: int = 64,
             workers: int = 2, progress: bool = True) -> dict:
    """Render `sizes[split]` clips of each split into `out`; resumes a partial run. Returns the manifest."""
    from tqdm import tqdm

    for split in sizes:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}.")
    cfg = asdict(config.resolved())
    os.makedirs(out, exist_ok=True)
    mpath = os.path.join(out, "manifest.json")
    manifest = {"format": FORMAT, "config": cfg, "shard_size": shard_size,
                "label_names": {k: list(v) for k, v in LABEL_NAMES.items()}, "splits": {}}
    if os.path.exists(mpath):
        old = read_manifest(out)
        if old["config"] != cfg or old["shard_size"] != shard_size:
            raise ValueError(f"{mpath} was generated with a different config or shard size "
                             f"({old['config']}, shard_size={old['shard_size']}); use a new directory.")
        manifest["splits"] = old["splits"]
    todo = []
    for split, n in sizes.items():
        done = manifest["splits"].get(split, {}).get("shards", {})
        keep = {}
        for s in range((n + shard_size - 1) // shard_size):
            first, count = s * shard_size, min(shard_size, n - s * shard_size)
            name = shard_name(split, s)
            if done.get(name) == [first, count] and os.path.exists(os.path.join(out, name)):
                keep[name] = [first, count]
            else:
                todo.append((split, first, count, name))
        manifest["splits"][split] = {"size": n, "shards": keep}
    _write_json(mpath, manifest)

    total = sum(t[2] for t in todo)
    bar = tqdm(total=total, unit="clip", desc=f"walt-data {out}", disable=not progress or total == 0)

    def finished(split, first, count):
        name = shard_name(split, first // shard_size)
        manifest["splits"][split]["shards"][name] = [first, count]
        _write_json(mpath, manifest)
        bar.update(count)

    jobs = [(cfg, split, first, count, os.path.join(out, name)) for split, first, count, name in todo]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            finished(*_render_shard(*job))
    else:
        ctx = multiprocessing.get_context("spawn")  # workers never inherit torch/OpenMP or open HDF5 state
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(_render_shard, *job) for job in jobs]
            for fut in cf.as_completed(futures):
                finished(*fut.result())
    bar.close()
    return manifest


def read_manifest(root: str) -> dict:
    path = os.path.join(root, "manifest.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; create the dataset with `walt-data generate --out {root}`.")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}; expected {FORMAT!r}.")
    return manifest


class WorldStore:
    """Random access to the clips of one split of a generated dataset (numpy dicts, as rendered)."""

    def __init__(self, root: str, split: str = "train"):
        self.root, self.split = root, split
        self.manifest = read_manifest(root)
        if split not in self.manifest["splits"]:
            raise KeyError(f"{root} has no split {split!r}; it has {sorted(self.manifest['splits'])}.")
        info = self.manifest["splits"][split]
        shards = sorted(info["shards"].items(), key=lambda kv: kv[1][0])
        n_done = sum(c for _, (_, c) in shards)
        if n_done != info["size"]:
            raise ValueError(f"{root}: split {split!r} has {n_done} of {info['size']} clips finished; "
                             f"rerun `walt-data generate --out {root}` to complete it.")
        self._shards = shards
        self._starts = np.array([first for _, (first, _) in shards])
        self.config = WorldConfig(**self.manifest["config"])
        self.label_names = {k: tuple(v) for k, v in self.manifest["label_names"].items()}
        self._files, self._pid = {}, None

    def __len__(self) -> int:
        return self.manifest["splits"][self.split]["size"]

    def _file(self, name):
        if self._pid != os.getpid():  # a forked DataLoader worker must open its own handles
            self._files, self._pid = {}, os.getpid()
        if name not in self._files:
            path = os.path.join(self.root, name)
            try:
                self._files[name] = h5py.File(path, "r")
            except OSError as e:
                raise OSError(f"{path}: cannot open shard listed in manifest.json ({e}).") from None
        return self._files[name]

    def load(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"clip {index} out of range for split {self.split!r} of size {len(self)}.")
        s = int(np.searchsorted(self._starts, index, side="right") - 1)
        name, (first, _) = self._shards[s]
        f = self._file(name)
        try:
            return {key: f[key][index - first] for key in f.keys()}
        except (OSError, KeyError) as e:
            raise OSError(f"{os.path.join(self.root, name)}: clip {index} could not be read ({e}).") from None

    def __getstate__(self):  # picklable for DataLoader workers: drop open handles
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None
        return state


__all__ = ["generate", "read_manifest", "WorldStore", "shard_name"]
