"""The feature file: walt's HDF5 format for frozen features, written by `walt-probe dump` and read
by the probes and the study. This module is the whole format, writer and reader; nothing else
opens these files.

Layout of `walt-features/1` (N clips; T' latent frames of h x w tokens; C channels):

    features/t0200/b02   float16 (N, T', h, w, C)  block 2's output at timestep 200 (0-based blocks)
    features/latent      float16 (N, T', h, w, C)  kind "latents": the autoencoder latents
                         chunks: one clip, as many whole frames as fit in 1 MiB
    frame_index          int64 (T',)    the input frame each latent frame stands for
    done                 bool (N,)      clip n is completely written (set after its data is flushed)
    clip_index           int64 (N,)     the clip's index in the data source (its noise key)
    video                uint8 (N, T, H, W, 3)  the clips as the model saw them (after resize/crop;
                                        absent when dumped with --no-video); for visualisations
    labels/<task>        int64 (N,)     class index, -1 where unknown; attrs class_names
    targets/<name>       (N, ...)       every other annotation the source provides, transformed
                                        like the video (depth, cam_to_world, intrinsics, boxes,
                                        box_valid, query, tracks, visible, ...). Per-clip shapes
                                        that vary (TAP-Vid's track counts) are padded to the
                                        largest: NaN for floats, -1 for integers, False for bools.

Root attributes: format, walt_version, git_sha, config (the run's full config as JSON), run,
kind (walt / random / latents), checkpoint (+ checkpoint_sha256), autoencoder
(+ autoencoder_sha256), step (-1: final EMA weights), mode, seed, noise_backend, blocks,
timesteps, data, data_format, split, video_size (T, H, W), num_clips, first_clip (the source
index of clip 0 of this file), store_video, torch_threads (intra-op threads of the dumping
process); a joined multi-rank file adds `shards`.

One writer per file, in a process of its own: datasets are preallocated and written by clip
index, `done` is set only once a clip's data is on disk, so a killed dump resumes at the first clip
not done, and the result is the file an uninterrupted dump writes. Under torchrun every rank writes
`<out>.rank{r}-of-{N}.h5` (a contiguous slice of the clips) and `join_shards` writes `<out>`, which
maps them into one file through HDF5 virtual datasets.
"""
from __future__ import annotations

import builtins
import json
import os
import pickle
import queue
import re
import struct
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection

import h5py
import numpy as np

FORMAT = "walt-features/1"
# Attributes that say nothing about the values; every other one must match to resume a file.
_INFORMATIVE = ("walt_version", "git_sha", "run", "checkpoint", "autoencoder", "shards", "torch_threads")
_MIB = 1 << 20


class FeatureFileError(ValueError):
    """A feature file that is missing, incomplete, corrupt, or not the one asked for."""


class FeatureWriteError(OSError):
    """Writing a feature file failed (no space left, I/O error, ...)."""


# ----------------------------------------------------------------------------- helpers
def shard_path(out: str, rank: int, world: int) -> str:
    return f"{out}.rank{rank}-of-{world}.h5"


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous range [lo, hi) of n clips that rank `rank` of `world` dumps."""
    return n * rank // world, n * (rank + 1) // world


def feature_chunks(shape, itemsize: int = 2, budget: int = _MIB) -> tuple:
    """Chunk of an (N, T', h, w, C) dataset: one clip, as many whole frames as fit in `budget`
    (rows of one frame when a frame alone is larger)."""
    T, h, w, C = shape
    frame = h * w * C * itemsize
    if frame <= budget:
        return (1, max(1, min(T, budget // frame)), h, w, C)
    return (1, 1, max(1, min(h, budget // (w * C * itemsize))), w, C)


def _plain(v):
    """An attribute value as a comparable Python value."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _short(v, n=80):
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def check_same_dump(path: str, old: dict, new: dict):
    """Raise FeatureFileError naming the first attribute of `new` that `old` (a file's) differs in,
    ignoring those that say nothing about the values (versions, paths)."""
    old = {k: _plain(v) for k, v in old.items()}
    if old.get("format") != FORMAT:
        raise FeatureFileError(f"{path} exists and is not a {FORMAT} feature file (format {old.get('format')!r}); "
                               "choose another --out.")
    for key, value in new.items():
        if key not in _INFORMATIVE and _plain(value) != old.get(key):
            raise FeatureFileError(f"{path} was written with a different {key} ({_short(old.get(key))}, now "
                                   f"{_short(_plain(value))}); write to another --out or delete it to start over.")


def _fill(dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.nan
    if dtype.kind in "iu":
        return -1 if dtype.kind == "i" else 0
    return False


def _runs(idx: np.ndarray):
    """Consecutive runs of a sorted index array: [(start, stop, offset into idx)]."""
    if len(idx) == 0:
        return []
    breaks = np.nonzero(np.diff(idx) != 1)[0] + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(idx)]])
    return [(int(idx[a]), int(idx[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


def _read_rows(ds, index) -> np.ndarray:
    """ds[index] along the first axis for any index array (any order, repeats allowed)."""
    if index is None:
        return ds[()]
    idx = np.asarray(index, dtype=np.int64).reshape(-1)
    n = ds.shape[0]
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"clip index out of range for {n} clips: {idx[(idx < 0) | (idx >= n)][:3].tolist()}")
    uniq, inverse = np.unique(idx, return_inverse=True)
    out = np.empty((len(uniq),) + ds.shape[1:], ds.dtype)
    for lo, hi, off in _runs(uniq):
        ds.read_direct(out, np.s_[lo:hi], np.s_[off:off + hi - lo])
    return out[inverse]


# ----------------------------------------------------------------------------- writer
class FeatureWriter:
    """Writes one feature file (or one rank's shard) from a process of its own.

    Creating: all datasets but the targets are preallocated in `<path>.tmp`, which is renamed to
    `path` once complete. Resuming: an existing `path` is reopened if its attributes match `attrs`
    (else FeatureFileError names the first that differs); `todo()` lists the clips not yet done.

        with FeatureWriter(path, attrs, feature_shapes=..., frame_index=..., label_names=...) as w:
            for local_idx, feats, extras in ...:
                w.put(local_idx, feats, **extras)      # blocks when `queue_size` groups wait

    Why a process and not a thread: h5py runs much of each write as Python code holding the GIL,
    and a dump's main thread gives the GIL up and takes it back around every torch op, so a
    writing thread stalled it far beyond its own CPU time (a third of a small model's throughput
    on 2 cores). The writing process is this file run as a script (`python h5.py --serve ...`:
    h5py and numpy only, started in a fraction of a second, sharing no memory with the dump,
    whose pages a forked child would turn copy-on-write), at a lower priority. It gets the batches
    through a pipe and acknowledges each one once it is in the file; errors raised there are
    re-raised here by the next put() or by close().

    Batches travel in groups of about `group_bytes`, and of at most a quarter of the file (any
    batch larger than that alone): every write opens and closes each of the ~20 datasets a batch
    fills, and for small batches (8 clips of a small model: 3 MB) that fixed work was most of the
    writing process's CPU time, taken from the dump's compute threads. A killed dump also loses
    the group it was filling: at most a few seconds of compute, or a quarter of a small dump.
    """

    def __init__(self, path: str, attrs: dict, *, feature_shapes: dict, frame_index, label_names: dict | None = None,
                 video_shape: tuple | None = None, queue_size: int = 4, group_bytes: int = 16 * _MIB):
        self.path = str(path)
        self.attrs = {"format": FORMAT, **attrs}
        self.n = int(self.attrs["num_clips"])
        if os.path.exists(self.path):
            self._check_resumable()
        else:
            self._create(feature_shapes, frame_index, label_names or {}, video_shape)
        with h5py.File(self.path, "r") as f:
            self._done = f["done"][:]
        self._error = None
        self._queue_size = max(1, int(queue_size))
        self._group_bytes = int(group_bytes)
        self._group, self._grouped = [], 0
        self._in_flight = 0
        self._closed = False
        # Two one-way pipes: batches to the writing process, acknowledgements back. Batches go
        # out from a thread of ours, which waits in the kernel (without the GIL) while the pipe is full.
        batches_in, batches_out = os.pipe()
        acks_in, acks_out = os.pipe()
        # Its stderr is kept aside: h5py prints a traceback for every handle it fails to close after
        # a failed write, and the error reaches the caller as one sentence anyway.
        self._stderr = tempfile.TemporaryFile()
        try:
            self._worker = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve", self.path, str(batches_in), str(acks_out)],
                pass_fds=(batches_in, acks_out), stdin=subprocess.DEVNULL, stderr=self._stderr)
        finally:
            os.close(batches_in)  # the child holds these ends: its exit closes the pipes
            os.close(acks_out)
        self._batches = _ArrayPipe(batches_out)
        self._acks = Connection(acks_in, writable=False)
        _widen(batches_out)
        self._outbox = queue.Queue()
        self._sender = threading.Thread(target=self._send_all, name="walt-feature-sender", daemon=True)
        self._sender.start()

    # -- opening ---------------------------------------------------------------------------------
    def _check_resumable(self):
        try:
            f = h5py.File(self.path, "r+")
        except OSError as e:
            raise FeatureFileError(f"{self.path} exists but cannot be opened to resume it ({_first_line(e)}); "
                                   "delete it to start over.") from None
        with f:
            check_same_dump(self.path, dict(f.attrs), self.attrs)

    def _create(self, feature_shapes, frame_index, label_names, video_shape):
        tmp = self.path + ".tmp"
        n = self.n
        try:
            with h5py.File(tmp, "w") as f:
                for key, value in self.attrs.items():
                    f.attrs[key] = value
                for key, shape in feature_shapes.items():
                    # Not compressed: float16 activations do not shrink under lzf (the same bytes,
                    # written 2.3x slower); the video and most annotations shrink 7x.
                    f.create_dataset(f"features/{key}", shape=(n, *shape), dtype=np.float16,
                                     chunks=feature_chunks(shape))
                f.create_dataset("frame_index", data=np.asarray(frame_index, np.int64))
                f.create_dataset("done", shape=(n,), dtype=bool, fillvalue=False)
                first = int(self.attrs.get("first_clip", 0))
                f.create_dataset("clip_index", data=np.arange(first, first + n, dtype=np.int64))
                for task, names in label_names.items():
                    ds = f.create_dataset(f"labels/{task}", shape=(n,), dtype=np.int64, fillvalue=-1)
                    ds.attrs["class_names"] = [str(x) for x in names]
                if video_shape is not None:
                    f.create_dataset("video", shape=(n, *video_shape), dtype=np.uint8, chunks=(1, *video_shape),
                                     compression="lzf")
            os.replace(tmp, self.path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise FeatureWriteError(f"cannot create {self.path} ({_first_line(e)}).") from None

    # -- state -----------------------------------------------------------------------------------
    def todo(self) -> np.ndarray:
        """Local indices (0..num_clips-1) of the clips not done when the writer opened, ascending."""
        return np.nonzero(~self._done)[0]

    # -- writing ---------------------------------------------------------------------------------
    def put(self, index, features: dict, video=None, labels: dict | None = None, targets: list | None = None):
        """Queue clips `index` (local indices, ascending) for writing: features {key: (B, ...) float16},
        video (B, T, H, W, 3) uint8, labels {task: (B,) int}, targets [one {name: array} per clip]."""
        self._collect(block=False)
        self._raise()
        batch = (np.asarray(index, np.int64), features, video, labels or {}, targets or [])
        self._group.append(batch)
        nbytes = _nbytes(batch)
        self._grouped += nbytes
        quarter = nbytes * self.n // (4 * max(1, len(batch[0])))  # a quarter of the file, at this batch's clip size
        if self._grouped >= min(self._group_bytes, quarter):
            while self._in_flight >= self._queue_size and self._error is None:
                self._collect(block=True)
            self._raise()
            self._send_group()

    def _send_group(self):
        if self._group:
            self._outbox.put(self._group)
            self._in_flight += 1
        self._group, self._grouped = [], 0

    def _send_all(self):
        """The sending thread: groups of batches (then None) to the writing side, in order."""
        while True:
            item = self._outbox.get()
            try:
                self._batches.send(item)
            except OSError:
                pass  # the writing side is gone: reading its acknowledgements says so
            if item is None:
                return

    def _worker_gone(self) -> FeatureWriteError:
        try:
            code = self._worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.seek(0)
        lines = [x.strip() for x in self._stderr.read().decode(errors="replace").splitlines() if x.strip()]
        said = next((x for x in lines if x.startswith("Fatal Python error")), lines[-1] if lines else "")
        return FeatureWriteError(f"the process writing {self.path} ended unexpectedly (exit code {code}"
                                 f"{': ' + said[:200] if said else ''}); rerun the dump to resume it.")

    def _collect(self, block: bool):
        """Take the writing side's acknowledgements: all that are ready (and wait for one if `block`)."""
        while self._in_flight and (block or self._acks.poll()):
            block = False
            if self._take() is None:
                self._in_flight = 0
                return
            self._in_flight -= 1

    def _take(self):
        """Read one message of the writing side and note what it says; its kind, or None when the
        writing side ended without saying it closed."""
        try:
            kind, value = self._acks.recv()
        except (EOFError, OSError):
            self._error = self._error or self._worker_gone()
            return None
        if kind == "done":
            self._done[value] = True
        elif kind in ("error", "closed") and value is not None and self._error is None:
            self._error = _as_exception(value)
        return kind

    def _raise(self):
        if self._error is not None:
            err, self._error = self._error, None
            self._shutdown()
            raise err

    # -- closing ---------------------------------------------------------------------------------
    def _shutdown(self):
        """Let the writing side finish what it was sent, close the file and end."""
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            self._send_group()  # the last group, whatever its size
        self._group = []
        self._outbox.put(None)
        self._sender.join()
        while self._take() not in (None, "closed"):
            pass
        self._in_flight = 0
        self._worker.wait()
        self._batches.close()
        self._acks.close()
        self._stderr.close()

    def close(self):
        """Wait for every queued batch, close the file, re-raise a writing error."""
        self._shutdown()
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def abort(self):
        """Stop after the batches already queued; the file keeps its `done` mask for a resume."""
        self._shutdown()
        self._error = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def _nbytes(batch) -> int:
    _, features, video, _, targets = batch
    return (sum(v.nbytes for v in features.values()) + (video.nbytes if video is not None else 0)
            + sum(getattr(v, "nbytes", 0) for clip in targets for v in clip.values()))


def _merged(group: list) -> list:
    """A group of batches as few batches as possible: consecutive ones holding the same features,
    labels and video are concatenated into one (clip indices stay ascending)."""
    out = [group[0]]
    for batch in group[1:]:
        last = out[-1]
        if (batch[1].keys() != last[1].keys() or batch[3].keys() != last[3].keys()
                or (batch[2] is None) != (last[2] is None)):
            out.append(batch)
            continue
        out[-1] = (
            np.concatenate([last[0], batch[0]]),
            {k: np.concatenate([last[1][k], batch[1][k]]) for k in last[1]},
            None if last[2] is None else np.concatenate([last[2], batch[2]]),
            {k: np.concatenate([np.asarray(last[3][k]), np.asarray(batch[3][k])]) for k in last[3]},
            list(last[4]) + list(batch[4]),
        )
    return out


def _serve(path: str, batches, acks):
    """The writing process of a FeatureWriter: writes each group of batches it receives (merged,
    one write per dataset), answers ("done", index) or ("error", (type name, message)) for each
    group, and ("closed", error or None) last. It stops at None or when the dumping process is
    gone (after writing what it was sent)."""
    failed, sink = False, None
    try:
        sink = FileSink(path)
        sys.unraisablehook = sink.note_unraisable
        while True:
            try:
                item = batches.recv()
            except (EOFError, OSError):
                break
            if item is None:
                break
            if failed:
                acks.send(("skipped", None))  # drain: the caller has the error already
                continue
            try:
                for batch in _merged(item):
                    sink.write(*batch)
                acks.send(("done", np.concatenate([index for index, *_ in item])))
            except Exception as e:  # noqa: BLE001  (re-raised in the caller)
                failed = True
                acks.send(("error", _describe(path, e)))
    except Exception as e:  # noqa: BLE001
        failed = True
        _send_quietly(acks, ("error", _describe(path, e)))
    closing = None
    # After a failed write HDF5's state is not to be trusted, so the file is left as its last flush
    # wrote it (its done mask says which clips that holds) instead of being closed.
    if sink is not None and not failed:
        try:
            sink.close()
        except Exception as e:  # noqa: BLE001
            closing = _describe(path, e)
    _send_quietly(acks, ("closed", closing))
    acks.close()
    return not failed and closing is None


def _lower_priority():
    """Writing is background work: the dump's compute threads come first (nice 10, not SCHED_IDLE,
    which on a machine busy with other jobs could starve the writer and so the dump)."""
    if hasattr(os, "nice"):
        os.nice(10)


def _widen(fd: int, size: int = 1 << 20):
    """Let a pipe hold 1 MiB (Linux; 64 KiB by default) so a batch crosses in fewer handovers."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (OSError, ValueError, ImportError):
        pass


class _ArrayPipe:
    """One end of a pipe carrying pickled objects whose large arrays travel beside the pickle
    (protocol 5, out of band): the sender makes no copy of them (its writes release the GIL, so
    the dump's main thread runs meanwhile) and the receiver reads their bytes straight into the
    arrays' memory. A batch's features are most of its bytes; through a plain pickle they were
    copied three times more on their way."""

    _IN_BAND = 1 << 16  # smaller buffers ride inside the pickle: one write instead of one each

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, obj):
        buffers = []

        def out_of_band(buf):
            raw = buf.raw()
            if raw.nbytes < self._IN_BAND:
                return True
            buffers.append(raw)
            return False

        head = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
        meta = pickle.dumps((head, [b.nbytes for b in buffers]), protocol=5)
        self._write(struct.pack("<Q", len(meta)) + meta)
        for b in buffers:
            self._write(b)

    def recv(self):
        (n,) = struct.unpack("<Q", self._read_into(bytearray(8)))
        head, sizes = pickle.loads(self._read_into(bytearray(n)))
        return pickle.loads(head, buffers=[self._read_into(np.empty(k, np.uint8)) for k in sizes])

    def _write(self, data):
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self.fd, view):]

    def _read_into(self, buf):
        view, pos = memoryview(buf).cast("B"), 0
        while pos < len(view):
            got = os.readv(self.fd, [view[pos:]])
            if got == 0:
                raise EOFError("the sending end of the pipe closed")
            pos += got
        return buf

    def close(self):
        os.close(self.fd)


def _send_quietly(conn, message):
    try:
        conn.send(message)
    except OSError:
        pass  # the dumping process is gone


def _describe(path: str, e: Exception) -> tuple[str, str]:
    """(type name, message) of an error in the writing process: one sentence for an I/O error."""
    if isinstance(e, OSError) or "errno = " in str(e):  # h5py raises RuntimeError for some failed writes
        return "FeatureWriteError", (f"cannot write features to {path} ({_first_line(e)}); free space or choose "
                                     "another --out, then rerun to resume.")
    return type(e).__name__, str(e)


def _as_exception(described: tuple[str, str]) -> Exception:
    """The exception the caller raises for _describe's (type name, message)."""
    name, message = described
    if name == "FeatureWriteError":
        return FeatureWriteError(message)
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(message)
    return RuntimeError(f"writing features failed: {name}: {message}")


class FileSink:
    """The file side of a FeatureWriter: an open feature file that batches of clips are written to.

    A batch's data is flushed to the file before its clips are marked done; the marks reach the
    disk with the next batch's flush (or at close), so a killed dump loses at most the batches in
    flight, and resumes at the first clip not done."""

    def __init__(self, path: str):
        self.path = path
        self.f = h5py.File(path, "r+")
        self.n = len(self.f["done"])
        self.failures = []

    def note_unraisable(self, unraisable):
        """sys.unraisablehook of the writing process: h5py reports a failed write (a full disk) only
        when it closes a dataset handle, as an exception nothing can catch; noted here, it stops
        the batch before the flush (which HDF5 does not survive after such a failure)."""
        self.failures.append(unraisable.exc_value)

    def write(self, index, features, video, labels, targets):
        self.failures.clear()
        self._write(index, features, video, labels, targets)
        self._check()
        self.f.flush()  # the clips' data is in the file before they are marked done
        self._check()
        self._dataset("done")[index] = True

    def _check(self):
        if self.failures:
            raise OSError(_first_line(self.failures[0]))

    def _dataset(self, name):
        """Dataset `name` (or None), opened for one write and closed after it: closing writes its
        chunks, so a full disk shows (as an unraisable error, noted above) before the file's
        flush, which would leave the metadata half written; kept open, it showed only there."""
        return self.f.get(name)

    def _write(self, index, features, video, labels, targets):
        columns = {f"features/{key}": arr for key, arr in features.items()}
        if video is not None:
            columns["video"] = video
        columns.update({f"labels/{task}": np.asarray(v, np.int64) for task, v in labels.items()})
        for lo, hi, off in _runs(index):
            for name, values in columns.items():
                ds = self._dataset(name)  # closed when rebound: its chunks are written then
                if ds is not None:
                    ds[lo:hi] = values[off:off + hi - lo]
        self._write_targets(index, targets)

    def _write_targets(self, index, targets):
        """Annotations of clips `index`: one write per run of clips where every clip's array has the
        dataset's shape (the usual case), else clip by clip (growing the dataset if needed)."""
        names = {name for clip in targets for name in clip}
        for name in sorted(names):
            values = [np.asarray(clip[name]) if name in clip else None for clip in targets]
            ds = self._dataset(f"targets/{name}")
            if ds is None and all(v is not None for v in values):
                self._write_target(name, int(index[0]), values[0])  # creates it
                ds = self._dataset(f"targets/{name}")
            shape = ds.shape[1:] if ds is not None else None
            if ds is not None and all(v is not None and v.shape == shape and v.dtype.kind in "biuf" for v in values):
                stacked = np.stack(values).astype(ds.dtype, copy=False)
                for lo, hi, off in _runs(index):
                    ds[lo:hi] = stacked[off:off + hi - lo]
                continue
            for i, v in zip(index, values):
                if v is not None:
                    self._write_target(name, int(i), v)

    def _write_target(self, name, i, value):
        f = self.f
        key = f"targets/{name}"
        if value.dtype.kind not in "biuf":
            return  # strings and objects are not annotations a probe reads
        if self._dataset(key) is None:
            f.create_dataset(
                key, shape=(self.n, *value.shape), dtype=value.dtype, fillvalue=_fill(value.dtype),
                maxshape=(self.n,) + (None,) * value.ndim, chunks=(1, *(max(1, s) for s in value.shape)),
                compression="lzf" if value.nbytes >= 4096 else None)
        ds = f[key]
        if value.ndim != ds.ndim - 1:
            raise ValueError(f"annotation {name!r} of clip {i} has {value.ndim} axes; earlier clips had {ds.ndim - 1}.")
        grown = tuple(max(a, b) for a, b in zip(ds.shape[1:], value.shape))
        if grown != ds.shape[1:]:
            ds.resize((self.n, *grown))
        ds[(i, *(slice(0, s) for s in value.shape))] = value.astype(ds.dtype, copy=False)

    def close(self):
        self.f.close()


def _first_line(e) -> str:
    """The gist of an error: its first line, or HDF5's system error where it names one."""
    text = str(e)
    system = re.search(r"error message = '([^']+)'", text)
    if system:
        return f"file write failed: {system.group(1)}"
    s = text.strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


# ----------------------------------------------------------------------------- joining shards
def join_shards(out: str, shards: list[str]) -> str:
    """Write `out`, one file whose datasets map the complete `shards` (contiguous slices, in order)
    through HDF5 virtual datasets. Shards are referred to by name, relative to `out`'s folder."""
    files = [FeatureFile(p) for p in shards]
    try:
        first = files[0]
        a0 = {k: v for k, v in first.attrs.items() if k not in ("num_clips", "first_clip")}
        start = first.attrs["first_clip"]
        for ff in files[1:]:
            a = {k: v for k, v in ff.attrs.items() if k not in ("num_clips", "first_clip")}
            for k in a0:
                if k not in _INFORMATIVE and a.get(k) != a0[k]:
                    raise FeatureFileError(f"{ff.path} differs from {first.path} in {k}; they are not shards of one dump.")
        if [ff.attrs["first_clip"] for ff in files] != list(np.cumsum([start] + [len(ff) for ff in files[:-1]])):
            raise FeatureFileError(f"the shards of {out} do not cover consecutive clips.")
        n = sum(len(ff) for ff in files)
        offsets = np.cumsum([0] + [len(ff) for ff in files])
        names = {name for ff in files for name in ff._dataset_names()}
        folder = os.path.dirname(os.path.abspath(out))
        tmp = out + ".tmp"
        with h5py.File(tmp, "w") as f:
            for k, v in first._raw_attrs().items():
                f.attrs[k] = v
            f.attrs["num_clips"], f.attrs["first_clip"] = n, start
            f.attrs["shards"] = [os.path.relpath(os.path.abspath(p), folder) for p in shards]
            f.create_dataset("frame_index", data=first.frame_index)
            for name in sorted(names - {"frame_index"}):
                dss = [ff._file().get(name) for ff in files]
                ref = next(d for d in dss if d is not None)
                tail = tuple(max(d.shape[k] for d in dss if d is not None) for k in range(1, ref.ndim))
                layout = h5py.VirtualLayout(shape=(n, *tail), dtype=ref.dtype)
                for ff, d, lo in zip(files, dss, offsets):
                    if d is None:
                        continue
                    src = h5py.VirtualSource(os.path.relpath(os.path.abspath(ff.path), folder), name, shape=d.shape)
                    layout[(slice(lo, lo + d.shape[0]), *(slice(0, s) for s in d.shape[1:]))] = src
                fill = _fill(ref.dtype) if name.startswith(("targets/", "labels/")) else 0
                vds = f.create_virtual_dataset(name, layout, fillvalue=fill)
                for k, v in ref.attrs.items():
                    vds.attrs[k] = v
        os.replace(tmp, out)
    except OSError as e:
        raise FeatureWriteError(f"cannot write {out} ({_first_line(e)}).") from None
    finally:
        for ff in files:
            ff.close()
    return out


# ----------------------------------------------------------------------------- reader
class FeatureFile:
    """A complete feature file, opened lazily (and again in each forked worker process).

        ff = FeatureFile("feats.h5", expect={"kind": "walt", "mode": "video"})
        ff.keys()                       # ['t0200/b02', ...]
        x = ff.features("t0200/b02", [3, 1, 4])      # float16 (3, T', h, w, C)
        y = ff.labels("motion"); ff.class_names("motion")
        d = ff.target("depth", [3, 1, 4])
        ff.frame_index, ff.video([0]), ff.attrs, ff.config

    Refuses (FeatureFileError, one sentence) a missing, truncated or corrupt file, one whose dump
    has not finished, and one whose attributes differ from `expect`.
    """

    def __init__(self, path: str, expect: dict | None = None, require_complete: bool = True):
        self.path = str(path)
        self._f, self._pid = None, None
        if not os.path.exists(self.path):
            raise FeatureFileError(f"{self.path} does not exist; write it with `walt-probe dump`.")
        f = self._file()
        self.attrs = {k: _plain(v) for k, v in self._guard(lambda: dict(f.attrs))().items()}
        if self.attrs.get("format") != FORMAT:
            raise FeatureFileError(f"{self.path} is not a {FORMAT} feature file (format {self.attrs.get('format')!r}).")
        for shard in self.attrs.get("shards", []):
            p = os.path.join(os.path.dirname(os.path.abspath(self.path)), shard)
            if not os.path.exists(p):
                raise FeatureFileError(f"{self.path} joins shard {p}, which is missing; keep the rank files beside it.")
        if "done" not in f:
            raise FeatureFileError(f"{self.path} is corrupt (no 'done' mask); rerun the dump.")
        done = self._guard(lambda: f["done"][()])()
        if require_complete and not done.all():
            raise FeatureFileError(f"{self.path}: {int(done.sum())} of {len(done)} clips done; rerun the dump to finish it.")
        self.done = done
        if expect:
            self.check(expect)

    # -- handles ---------------------------------------------------------------------------------
    def _file(self):
        if self._pid != os.getpid():  # after a fork: never share an HDF5 handle between processes
            self._f, self._pid = None, os.getpid()
        if self._f is None:
            try:
                self._f = h5py.File(self.path, "r")
            except OSError as e:
                raise FeatureFileError(f"{self.path} is truncated or corrupt ({_first_line(e)}); delete it and rerun the dump.") from None
        return self._f

    def _guard(self, fn):
        def wrapped(*a, **k):
            try:
                return fn(*a, **k)
            except OSError as e:
                raise FeatureFileError(f"{self.path} is truncated or corrupt ({_first_line(e)}); delete it and rerun the dump.") from None
        return wrapped

    def _raw_attrs(self):
        return dict(self._file().attrs)

    def _dataset_names(self):
        names = []
        self._file().visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        return names

    def close(self):
        if self._f is not None and self._pid == os.getpid():
            self._f.close()
        self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __getstate__(self):  # picklable for DataLoader workers: each opens its own handle
        state = dict(self.__dict__)
        state["_f"], state["_pid"] = None, None
        return state

    def __len__(self) -> int:
        return len(self.done)

    # -- attributes ------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """The run config the features were computed with."""
        return json.loads(self.attrs["config"])

    def check(self, expect: dict):
        """Raise FeatureFileError naming the first attribute that differs from `expect`."""
        for key, value in expect.items():
            if key not in self.attrs:
                raise FeatureFileError(f"{self.path} has no attribute {key!r} (expected {_short(value)}).")
            have, want = self.attrs[key], _plain(value)
            if isinstance(have, list) and not isinstance(want, list):
                want = [want]
            if have != want:
                raise FeatureFileError(f"{self.path} has {key}={_short(have)}, expected {_short(want)}.")

    # -- features --------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Feature names: 't0200/b02', ... or 'latent'."""
        g = self._file().get("features", {})
        out = []
        for name, obj in g.items():
            if isinstance(obj, h5py.Dataset):
                out.append(name)
            else:
                out += [f"{name}/{b}" for b in obj]
        return sorted(out)

    def _resolve(self, key) -> str:
        if isinstance(key, tuple):
            t, b = key
            key = "latent" if b == "latent" else f"t{int(t):04d}/b{int(b):02d}"
        key = str(key)
        if key.endswith("/latent") or key == "latent":
            key = "latent"  # the latent control has no timestep: every t names the same latents
        if f"features/{key}" not in self._file():
            raise FeatureFileError(f"{self.path} has no features {key!r}; it has {self.keys()}.")
        return f"features/{key}"

    def shape(self, key) -> tuple:
        """(N, T', h, w, C) of a feature."""
        return tuple(self._file()[self._resolve(key)].shape)

    def features(self, key, index=None) -> np.ndarray:
        """float16 (len(index), T', h, w, C) of clips `index` (any order; all clips when None)."""
        return self._guard(_read_rows)(self._file()[self._resolve(key)], index)

    @property
    def frame_index(self) -> np.ndarray:
        return self._file()["frame_index"][()]

    @property
    def clip_index(self) -> np.ndarray:
        return self._file()["clip_index"][()]

    def video(self, index=None) -> np.ndarray:
        """uint8 (len(index), T, H, W, 3): the clips as the model saw them."""
        if "video" not in self._file():
            raise FeatureFileError(f"{self.path} holds no input video (dumped with --no-video).")
        return self._guard(_read_rows)(self._file()["video"], index)

    # -- labels and targets ----------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """Classification tasks with labels in this file."""
        return sorted(self._file().get("labels", {}))

    @property
    def target_names(self) -> list[str]:
        """Annotations stored beside the features (depth, tracks, ...)."""
        return sorted(self._file().get("targets", {}))

    def labels(self, task: str, index=None) -> np.ndarray:
        if task not in self.tasks:
            raise FeatureFileError(f"{self.path} has no {task!r} labels (its data {self.attrs.get('data')!r} has "
                                   f"{self.tasks or 'none'}); dump features of a data set with {task} labels.")
        return self._guard(_read_rows)(self._file()[f"labels/{task}"], index)

    def class_names(self, task: str) -> tuple:
        self.labels(task, [])
        return tuple(_plain(self._file()[f"labels/{task}"].attrs["class_names"]))

    def target(self, name: str, index=None) -> np.ndarray:
        if name not in self.target_names:
            raise FeatureFileError(f"{self.path} has no {name!r} annotations (its data {self.attrs.get('data')!r} "
                                   f"provides {self.target_names or 'none'}); dump features of a data set that has them.")
        return self._guard(_read_rows)(self._file()[f"targets/{name}"], index)


__all__ = [
    "FORMAT",
    "FeatureFile",
    "FeatureFileError",
    "FeatureWriteError",
    "FeatureWriter",
    "check_same_dump",
    "feature_chunks",
    "join_shards",
    "rank_slice",
    "shard_path",
]


def _main(argv):
    """`python h5.py --serve PATH BATCHES_FD ACKS_FD`: the writing process of a FeatureWriter."""
    if len(argv) != 4 or argv[0] != "--serve":
        raise SystemExit("usage: python h5.py --serve PATH BATCHES_FD ACKS_FD (started by FeatureWriter)")
    import faulthandler

    faulthandler.enable()  # a crash inside HDF5 leaves a traceback on stderr
    _lower_priority()
    ok = _serve(argv[1], _ArrayPipe(int(argv[2])), Connection(int(argv[3]), readable=False))
    os._exit(0 if ok else 1)  # without tearing down h5py's handles to a file that failed


if __name__ == "__main__":
    _main(sys.argv[1:])
