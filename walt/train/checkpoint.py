"""Training checkpoints (atomic, pickle-free to load) and safetensors weight export.

A checkpoint holds model, EMA, optimizer, scheduler, task state (e.g. a discriminator), RNG
states and the step; it is written to a temporary file and renamed, so a crash never leaves a
half-written checkpoint where the last good one was. Only tensors and plain containers are
stored, so it loads with torch.load(weights_only=True).
"""
import json
import os
import random
import re
import zipfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def rng_state():
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


class WriteError(OSError):
    """An output could not be written (a full disk, a read-only file system); the file it was to
    replace, if any, is untouched."""

    def __str__(self):
        return self.args[1] if len(self.args) > 1 else super().__str__()


def _write_failed(path, tmp, error):
    """Raise WriteError naming `path` and the system's reason, after removing the temp file."""
    try:
        os.remove(tmp)
    except OSError:
        pass
    code, reason = None, None
    for e in (error, error.__cause__, error.__context__):  # torch.save wraps the OSError of the write
        if isinstance(e, OSError) and e.strerror:
            code, reason = e.errno, e.strerror
            break
    if reason is None:
        match = re.search(r"os error (\d+)", str(error))  # safetensors' Rust I/O errors
        if match:
            code = int(match.group(1))
            reason = os.strerror(code)
    if reason is None:
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    raise WriteError(code, f"cannot write {path}: {reason}") from None


def save(path, state):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # a Python file: a failed write keeps its OSError (errno) in the chain
            torch.save(state, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        _write_failed(path, tmp, e)


# What every training checkpoint holds (see the module docstring).
CHECKPOINT_KEYS = ("step", "model", "ema", "optimizer", "scheduler", "extra", "rng")


def load(path, map_location="cpu"):
    """A training checkpoint; ValueError (one sentence saying what is wrong with the file) otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; run without --resume to start a new run")
    what = f"checkpoint {path} could not be read as a walt training checkpoint"
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{what}: the file is empty (a copy or write that never finished)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose directory is at the end
        raise ValueError(f"{what}: it is not a complete torch.save archive ({size:,} bytes; truncated, or another kind of file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # damaged inside, or holding objects other than tensors and plain containers
        if "Weights only load failed" in str(e):
            raise ValueError(f"{what}: it holds Python objects besides tensors and plain containers, which are not "
                             f"unpickled (not a file written by walt-train)") from None
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "") or type(e).__name__
        raise ValueError(f"{what}: the archive is damaged ({first[:200]})") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise ValueError(f"{what}: it lacks {missing} (not a file written by walt-train)")
    return state


def _umask():
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_safetensors(path, module, metadata=None):
    """The module's state dict (parameters and buffers) as safetensors, with string metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates files 0600; give them the mode of every other output
        os.replace(tmp, path)
    except Exception as e:  # OSError, or safetensors' own error type for a failed write
        _write_failed(path, tmp, e)


def load_weights(module, path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        module.load_state_dict(load_file(path))
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[1:2] or [str(e)]
        raise ValueError(f"{path} does not match the configured {type(module).__name__} ({detail[0].strip()[:200]})") from None
    return module
