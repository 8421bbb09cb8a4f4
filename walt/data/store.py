"""Generate the procedural world to disk as HDF5 shards, and read it back.

Layout of a dataset directory:
    manifest.json          config, label names, and for each split its size and finished shards
    train-00000.h5 ...     `shard_size` consecutive clips each; one dataset per key of
                           `world.render_clip` with a leading clip axis, chunked one clip per chunk

Generation survives being killed: a shard is written to `<name>.tmp` and renamed when complete,
and the manifest (itself replaced atomically) lists only finished shards, so a rerun with the
same config renders only what is missing. The manifest also records each finished shard's byte
size and sha256 (`checksums`); a rerun verifies every finished shard against them and renders a
damaged one again. Shards are rendered in a process pool whose workers die with their parent;
since every clip depends only on (config, split, index), the result does not depend on the
number of workers. A write error (a full or read-only disk) stops generation with a
`StoreWriteError` naming the path; finished shards stay valid and a rerun continues.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import threading
from dataclasses import asdict

import h5py
import numpy as np

from walt.data.world import LABEL_NAMES, SPLITS, WorldConfig, render_clip
from walt.runs import sha256  # one file-checksum helper for shards and weights

FORMAT = "walt-world/2"
_COMPRESSED = {"video", "depth", "mask"}


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.h5"


class StoreWriteError(OSError):
    """A file of the dataset could not be written (e.g. no space left, read-only file system)."""

    def __init__(self, path: str, error: OSError):
        reason = error.strerror or str(error)
        super().__init__(error.errno, f"cannot write {path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):  # raised in pool workers, re-raised in the parent
        return _store_write_error, (self.path, self.errno, self.reason)

    def __str__(self):
        return self.args[1]


def _store_write_error(path, errno, reason):
    return StoreWriteError(path, OSError(errno, reason))


def _write_bytes(path: str, data: bytes) -> None:
    """data to `path` through `<path>.tmp` and a rename; a failed write removes the temp file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise StoreWriteError(path, e) from None


def _write_json(path, obj):
    _write_bytes(path, json.dumps(obj, indent=1).encode())


def _shard_bytes(config: dict, split: str, first: int, count: int) -> bytes:
    """One shard as the bytes of an HDF5 file, built in memory: HDF5 itself never writes to disk,
    so a write error is an ordinary Python OSError (HDF5 can crash on a full disk)."""
    cfg = WorldConfig(**config)
    clips = [render_clip(cfg, split, first + i) for i in range(count)]
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["config"] = json.dumps(config)
        f.attrs["split"], f.attrs["first"], f.attrs["count"] = split, first, count
        for key in clips[0]:
            data = np.stack([c[key] for c in clips])
            f.create_dataset(key, data=data, chunks=(1,) + data.shape[1:],
                             compression="lzf" if key in _COMPRESSED else None)
    return buf.getvalue()


def _render_shard(config: dict, split: str, first: int, count: int, path: str) -> tuple[str, int, int, dict]:
    data = _shard_bytes(config, split, first, count)
    _write_bytes(path, data)
    return split, first, count, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _shard_is_intact(path: str, first: int, count: int, checksum: dict | None) -> bool:
    """Whether a finished shard is still what was written: its size and sha256 as recorded, or
    (for a manifest without checksums) an HDF5 file whose datasets all read back with `count` clips."""
    try:
        if checksum is not None:
            return os.path.getsize(path) == checksum["bytes"] and sha256(path) == checksum["sha256"]
        with h5py.File(path, "r") as f:
            if int(f.attrs["first"]) != first or int(f.attrs["count"]) != count or not len(f.keys()):
                return False
            return all(f[key][()].shape[0] == count for key in f.keys())
    except (OSError, KeyError, ValueError, TypeError):
        return False


def _die_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when the generating process dies, even by SIGKILL (which
    runs no cleanup), so no orphaned workers or resource tracker are left behind."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # the parent died before prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch():  # elsewhere: poll the parent's pid
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def validate(config: WorldConfig, sizes: dict, shard_size: int, workers: int) -> None:
    """Every argument of `generate`, checked before anything is written (ValueError: one sentence).

    Clips must suit the autoencoders that train on them: every preset compresses space 4x or 8x
    and time 4x after the first frame, so frames are a multiple of 8 pixels high and wide and a
    clip has 1 + a multiple of 4 frames (1 for images, 5, 9, 17, ...).
    """

    def integer(value, name, low):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")

    if not isinstance(sizes, dict) or not sizes:
        raise ValueError(f"sizes must map split names {SPLITS} to clip counts, got {sizes!r}.")
    for split, n in sizes.items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}.")
        integer(n, f"the size of split {split!r}", 0)
    integer(config.seed, "seed", 0)
    integer(shard_size, "shard_size (clips per shard)", 1)
    integer(workers, "workers", 0)
    integer(config.frames, "frames", 1)
    integer(config.height, "the frame height", 8)
    integer(config.width, "the frame width", 8)
    integer(config.track_points, "track_points", 1)
    integer(config.max_objects, "max_objects", 1)
    if config.height % 8 or config.width % 8:
        raise ValueError(f"frame size must be a multiple of 8 pixels (the autoencoders downsample 4x or 8x), "
                         f"got {config.height}x{config.width}.")
    if (config.frames - 1) % 4:
        raise ValueError(f"frames must be 1 + a multiple of 4 (the autoencoders compress time 4x after the first "
                         f"frame; e.g. 1, 5, 9, 17), got {config.frames}.")
    if not 0 < config.fov_degrees < 180:
        raise ValueError(f"fov_degrees must be in (0, 180), got {config.fov_degrees!r}.")


def generate(out: str, config: WorldConfig, sizes: dict[str, int], shard_size: int = 64,
             workers: int = 2, progress: bool = True) -> dict:
    """Render `sizes[split]` clips of each split into `out`; resumes a partial run. Returns the manifest."""
    from tqdm import tqdm

    validate(config, sizes, shard_size, workers)
    cfg = asdict(config.resolved())
    mpath = os.path.join(out, "manifest.json")
    manifest = {"format": FORMAT, "config": cfg, "shard_size": shard_size,
                "label_names": {k: list(v) for k, v in LABEL_NAMES.items()}, "splits": {}}
    if os.path.exists(mpath):
        old = read_manifest(out)
        finished_any = any(info.get("shards") for info in old["splits"].values())
        if (old["config"] != cfg or old["shard_size"] != shard_size) and finished_any:
            raise ValueError(f"{mpath} was generated with a different config or shard size "
                             f"({old['config']}, shard_size={old['shard_size']}); use a new directory.")
        if finished_any:  # else nothing was finished: the new config simply replaces the old one
            manifest["splits"] = old["splits"]
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise StoreWriteError(out, e) from None
    todo = []
    for split, n in sizes.items():
        info = manifest["splits"].get(split, {})
        done, sums = info.get("shards", {}), info.get("checksums", {})
        keep, keep_sums = {}, {}
        for s in range((n + shard_size - 1) // shard_size):
            first, count = s * shard_size, min(shard_size, n - s * shard_size)
            name = shard_name(split, s)
            if done.get(name) == [first, count] and _shard_is_intact(os.path.join(out, name), first, count, sums.get(name)):
                keep[name] = [first, count]
                if name in sums:
                    keep_sums[name] = sums[name]
            else:
                todo.append((split, first, count, name))
        manifest["splits"][split] = {"size": n, "shards": keep, "checksums": keep_sums}
    _write_json(mpath, manifest)

    total = sum(t[2] for t in todo)
    bar = tqdm(total=total, unit="clip", desc=f"walt-data {out}", disable=not progress or total == 0)

    def finished(split, first, count, checksum):
        name = shard_name(split, first // shard_size)
        manifest["splits"][split]["shards"][name] = [first, count]
        manifest["splits"][split]["checksums"][name] = checksum
        _write_json(mpath, manifest)
        bar.update(count)

    jobs = [(cfg, split, first, count, os.path.join(out, name)) for split, first, count, name in todo]
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                finished(*_render_shard(*job))
        else:
            ctx = multiprocessing.get_context("spawn")  # workers never inherit torch/OpenMP or open HDF5 state
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_die_with_parent,
                                        initargs=(os.getpid(),)) as pool:
                futures = [pool.submit(_render_shard, *job) for job in jobs]
                error = None
                for fut in cf.as_completed(futures):
                    if fut.cancelled():
                        continue
                    try:
                        finished(*fut.result())
                    except StoreWriteError as e:  # stop: record what finishes, start nothing new
                        error = error or e
                        for other in futures:
                            other.cancel()
                if error is not None:
                    raise error
    finally:
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

    def load(self, index: int, keys=None) -> dict[str, np.ndarray]:
        """Clip `index` as rendered; `keys` limits which arrays are read (all by default)."""
        if not 0 <= index < len(self):
            raise IndexError(f"clip {index} out of range for split {self.split!r} of size {len(self)}.")
        s = int(np.searchsorted(self._starts, index, side="right") - 1)
        name, (first, _) = self._shards[s]
        f = self._file(name)
        try:
            return {key: f[key][index - first] for key in (f.keys() if keys is None else keys)}
        except (OSError, KeyError) as e:
            raise OSError(f"{os.path.join(self.root, name)}: clip {index} could not be read ({e}).") from None

    def __getstate__(self):  # picklable for DataLoader workers: drop open handles
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None
        return state


__all__ = ["generate", "read_manifest", "validate", "StoreWriteError", "WorldStore", "shard_name"]
