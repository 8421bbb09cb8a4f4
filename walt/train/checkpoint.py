"""Training checkpoints (atomic, pickle-free to load) and safetensors weight export.

A checkpoint holds model, EMA, optimizer, scheduler, task state (e.g. a discriminator), RNG
states and the step; it is written to a temporary file and renamed, so a crash never leaves a
half-written checkpoint where the last good one was. Only tensors and plain containers are
stored, so it loads with torch.load(weights_only=True).
"""
import json
import os
import random

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


def save(path, state):
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path, map_location="cpu"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; run without --resume to start a new run")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"checkpoint {path} could not be read as a walt training checkpoint ({e})") from e


def export_safetensors(path, module, metadata=None):
    """The module's state dict (parameters and buffers) as safetensors, with string metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_weights(module, path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        module.load_state_dict(load_file(path))
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[1:2] or [str(e)]
        raise ValueError(f"{path} does not match the configured {type(module).__name__} ({detail[0].strip()[:200]})") from None
    return module
