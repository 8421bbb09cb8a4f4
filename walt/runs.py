"""Loading a run directory: its config, weights (final, EMA or a kept snapshot) and their sha256.

A run directory is what `walt-train` leaves: `config.yaml`, `checkpoint.pt`, and when training
ends `model.safetensors` (+ `ema.safetensors`); diffusion runs with `train.keep_every` also keep
EMA snapshots `snapshots/step-NNNNNN.safetensors`. Feature dumps and the study read runs only
through this module.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re

from walt.train.checkpoint import load_weights


def snapshot_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "snapshots", f"step-{step:06d}.safetensors")


def snapshot_steps(run_dir: str) -> list[int]:
    """Steps of the EMA snapshots a diffusion run kept, ascending."""
    names = glob.glob(os.path.join(run_dir, "snapshots", "step-*.safetensors"))
    return sorted(int(re.search(r"step-(\d+)\.safetensors$", n).group(1)) for n in names)


def run_config(run_dir: str, stage: str | None = None):
    """The RunConfig a run directory was trained with; `stage` ("autoencoder" or "diffusion")
    refuses a run of the other kind."""
    from walt.config import from_yaml_file

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a walt run directory (no config.yaml); train one with `walt-train`.")
    cfg = from_yaml_file(path)
    if stage is not None and cfg.stage != stage:
        raise ValueError(f"{run_dir} holds a {cfg.stage!r} run, expected a {stage} run.")
    return cfg


def autoencoder_config(run_dir: str):
    """The AutoencoderConfig an autoencoder run directory was trained with."""
    return run_config(run_dir, "autoencoder").autoencoder


def weights_path(run_dir: str, ema: bool = True, step: int | None = None) -> str:
    """The weights file of a run: the snapshot at `step`, else EMA (when kept and asked for), else
    the final model. Raises when the run has not finished or has no such snapshot."""
    if step is not None:
        path = snapshot_path(run_dir, step)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{run_dir} has no snapshot at step {step}; it has {snapshot_steps(run_dir) or 'none'} "
                                    "(set train.keep_every to keep snapshots).")
        return path
    for name in (("ema.safetensors",) if ema else ()) + ("model.safetensors",):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{run_dir} has no exported weights (model.safetensors); has its training finished? "
                            f"Continue it with `walt-train ... --out {run_dir} --resume`.")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_autoencoder(run_dir: str, device="cpu"):
    """The trained autoencoder (with its per-mode latent statistics) of an autoencoder run."""
    from walt.models.autoencoder import CausalVAE

    vae = CausalVAE(autoencoder_config(run_dir))
    return load_weights(vae, weights_path(run_dir, ema=False)).to(device).eval().requires_grad_(False)


def load_transformer(run_dir: str, ema: bool = True, device="cpu", attention_backend: str | None = None,
                     step: int | None = None, weights: bool = True):
    """(WALT, run config) of a diffusion run: EMA weights by default, the snapshot at `step` when
    given, or the initial (untrained) weights of the same architecture with `weights=False`."""
    from walt.models.transformer import WALT

    cfg = run_config(run_dir, "diffusion")
    mcfg = cfg.model if attention_backend is None else dataclasses.replace(cfg.model, attention_backend=attention_backend)
    if not weights:
        model = WALT.from_seed(mcfg, cfg.train.seed)  # the weights walt-train started this run from
    else:
        model = load_weights(WALT(mcfg), weights_path(run_dir, ema, step))
    return model.to(device).eval().requires_grad_(False), cfg
