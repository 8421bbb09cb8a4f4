"""Feature extraction: the compute core of a feature dump. No I/O; `walt.features.h5` stores what
it yields and `walt.features.dump` connects data, backbone and file.

The probing protocol (DESIGN 2.4), for each clip and each timestep t:

    x0  = latents_for(mode, vae, clip)                   the run's mode decides how it sees a clip
    x_t = add_noise(x0, t, alphas_cumprod, seed, key)    walt's fused op, key = the clip's id
    one forward pass -> the outputs of the requested blocks (WALT.forward_features)

with the self-conditioning slot zero and the null label. Blocks are 0-based (the paper's
"l = 11-16" are blocks 10-15 here). Timesteps index the run's 1000-step schedule; t = 0 is its
first index, alpha_bar[0] = 1 - beta_0 = 1 - 1e-4 (the zero-terminal-SNR rescale keeps it), so
x_0 = 0.99995 x0 + 0.01 eps: practically the clean latent, yet the same code path as any t.

A clip's features depend on nothing but (backbone, clip, its id, seed): the noise is keyed by the
clip id, and every clip runs through the autoencoder and the transformer in a forward pass of its
own (batch 1), so neither the batch size nor the rank count nor where a resumed dump restarted
changes a bit. (CPU GEMMs, cuBLAS and oneDNN convolutions pick their blocking from the batch
size, so a batched forward would give results that differ in the last bits with the batch's
composition.) Thread counts: noise and the transformer's attention are walt's own ops, bitwise
thread-invariant; the linear layers are too at the sizes the tests use, but oneDNN's convolutions
in the autoencoder (and MKL GEMMs at large sizes) may round differently with another thread count,
so dumps meant to be bitwise comparable run with the same number of threads per process (the file
records it as `torch_threads`).

Controls (DESIGN 2.4): kind "random" is the same architecture with the run's initial weights,
kind "latents" the autoencoder latents themselves (no noise, no transformer), stored as the block
named "latent".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from walt.data.modes import frame_index, latent_frames, latents_for

KINDS = ("walt", "random", "latents")
LATENT = "latent"


def feature_key(t: int | None, block) -> str:
    """The name of a (timestep, block) feature in files and CLIs: 't0200/b02', or 'latent'."""
    if block == LATENT:
        return LATENT
    return f"t{int(t):04d}/b{int(block):02d}"


def check_blocks(blocks, depth: int) -> tuple[int, ...]:
    """Validated 0-based block indices (sorted, unique); one sentence on an out-of-range block."""
    blocks = tuple(sorted({int(b) for b in blocks}))
    if not blocks:
        raise ValueError("at least one block index is needed.")
    for b in blocks:
        if not 0 <= b < depth:
            raise ValueError(f"block {b} is out of range: the model has {depth} blocks, numbered 0-{depth - 1} "
                             f"(0-based; the paper's l = 1-{depth} are blocks 0-{depth - 1}).")
    return blocks


def check_timesteps(timesteps, num_steps: int) -> tuple[int, ...]:
    """Validated timesteps (sorted, unique) in [0, num_steps - 1]."""
    timesteps = tuple(sorted({int(t) for t in timesteps}))
    if not timesteps:
        raise ValueError("at least one timestep is needed.")
    for t in timesteps:
        if not 0 <= t < num_steps:
            raise ValueError(f"timestep {t} is outside [0, {num_steps - 1}] (the run's {num_steps}-step schedule).")
    return timesteps


@dataclass
class Backbone:
    """What features are computed with: the autoencoder, the transformer (None for kind "latents"),
    the run's noise table, and the (timestep, block) pairs tapped."""

    kind: str
    mode: str
    vae: torch.nn.Module
    model: torch.nn.Module | None
    alphas_cumprod: torch.Tensor  # float64, the run's schedule
    blocks: tuple = ()
    timesteps: tuple = ()
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # {clip id: latents} shared by dumps of the same clips through the same autoencoder and mode
    # (the study dumps each split several times): the latents are computed once per clip.
    latent_cache: dict | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"feature kind must be one of {KINDS}, got {self.kind!r}.")
        if self.kind == "latents":
            self.blocks, self.timesteps = (), ()
        else:
            if self.model is None:
                raise ValueError(f"kind {self.kind!r} needs a transformer.")
            if self.model.cfg.mode != self.mode:
                raise ValueError(f"the transformer is a {self.model.cfg.mode!r} model, not {self.mode!r}.")
            self.blocks = check_blocks(self.blocks, self.model.cfg.depth)
            self.timesteps = check_timesteps(self.timesteps, len(self.alphas_cumprod))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {self.seed!r}.")
        self.device = torch.device(self.device)

    @property
    def keys(self) -> list[str]:
        """Feature names in the order they are computed."""
        if self.kind == "latents":
            return [LATENT]
        return [feature_key(t, b) for t in self.timesteps for b in self.blocks]

    def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        ae = self.vae.cfg
        return latent_frames(self.mode, frames, ae.temporal_factor), height // ae.spatial_factor, width // ae.spatial_factor

    def feature_shapes(self, frames: int, height: int, width: int) -> dict[str, tuple]:
        """{key: (T', h, w, C)} of one clip of frames x height x width."""
        T, h, w = self.latent_grid(frames, height, width)
        if self.kind == "latents":
            return {LATENT: (T, h, w, self.vae.cfg.latent_channels)}
        p, width_ = self.model.cfg.patch_size, self.model.cfg.width
        return {k: (T, h // p, w // p, width_) for k in self.keys}

    def frame_index(self, frames: int):
        """(T',) int64: the input frame each latent frame stands for (walt.data.modes.frame_index)."""
        return frame_index(self.mode, frames, self.vae.cfg.temporal_factor)

    @torch.no_grad()
    def clip_features(self, video: torch.Tensor, clip_id: int) -> dict[str, torch.Tensor]:
        """Features {key: (T', h, w, C) float32} of one clip (T, 3, H, W) in [-1, 1]."""
        if self.latent_cache is None:
            return self.features_from_latents(self.latents(video), clip_id)
        if clip_id not in self.latent_cache:
            self.latent_cache[clip_id] = self.latents(video)
        return self.features_from_latents(self.latent_cache[clip_id], clip_id)

    @torch.no_grad()
    def latents(self, video: torch.Tensor) -> torch.Tensor:
        """(T', h, w, C): the clip (T, 3, H, W) as the run's mode sees it (walt.data.modes.latents_for)."""
        return latents_for(self.mode, self.vae, video.to(self.device, torch.float32)[None])[0]

    @torch.no_grad()
    def features_from_latents(self, z: torch.Tensor, clip_id: int) -> dict[str, torch.Tensor]:
        """Features {key: (T', h, w, C) float32} of a clip's latents z (T', h, w, C)."""
        x0 = z[None]
        if self.kind == "latents":
            return {LATENT: x0[0]}
        from walt.ops import add_noise  # the fused op: the noise of a clip is keyed by its id

        ab = self.alphas_cumprod.to(self.device)
        key = torch.tensor([int(clip_id)], dtype=torch.long, device=self.device)
        out = {}
        for t in self.timesteps:
            tt = torch.full((1,), t, dtype=torch.long, device=self.device)
            x_t, _ = add_noise(x0, tt, ab, seed=self.seed, keys=key, target="v")
            # self_cond=None is the zero self-conditioning slot; y=None the null label
            taps = self.model.forward_features(x_t, tt, list(self.blocks))
            for b in self.blocks:
                out[feature_key(t, b)] = taps[b][0]
        return out


def extract(backbone: Backbone, batches):
    """Features of batches of clips: for each (clip ids (B,), clips (B, T, 3, H, W)) of `batches`,
    yields (clip ids, {key: (B, T', h, w, C) float32}). A generator, like edm2's generate_images:
    the caller decides what to do with each batch (write it, time it, drop it)."""
    for ids, video in batches:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if video.dim() != 5 or video.shape[2] != 3 or len(video) != len(ids):
            raise ValueError(f"extract expects (clip ids (B,), clips (B, T, 3, H, W)), got {len(ids)} ids and clips "
                             f"of shape {tuple(video.shape)}.")
        per_clip = [backbone.clip_features(v, int(i)) for i, v in zip(ids, video)]
        yield ids, {k: torch.stack([c[k] for c in per_clip]) for k in per_clip[0]}


__all__ = ["KINDS", "LATENT", "Backbone", "check_blocks", "check_timesteps", "extract", "feature_key"]
