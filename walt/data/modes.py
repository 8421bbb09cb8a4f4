"""What each mode sees of a clip: the one definition that training, features and probes share.

V-WALT (`"video"`) sees the causal encoding of the whole clip: 1 + f_t*k input frames become
1 + k latent frames; latent frame 0 stands for input frame 0 alone and latent frame j >= 1 for
input frames f_t*(j-1)+1 .. f_t*j (17 frames -> 5 latent frames with f_t = 4).

I-WALT (`"image"`) sees every input frame as its own image: each frame goes through the
autoencoder alone (a 1-frame video) and becomes one latent frame, and the transformer then
processes the frames independently. No path crosses frames, not even the autoencoder's.

Each mode's latents are normalized with that mode's statistics (clip latents for V-WALT,
single-frame latents for I-WALT), measured when the autoencoder is trained.
"""
from __future__ import annotations

import torch

MODES = ("video", "image")


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def latent_frames(mode: str, frames: int, temporal_factor: int) -> int:
    """Latent frames a `frames`-frame clip becomes in `mode`."""
    _check_mode(mode)
    return frames if mode == "image" else (frames - 1) // temporal_factor + 1


def frame_index(mode: str, frames: int, temporal_factor: int) -> torch.Tensor:
    """(T',) int64: the last input frame each latent frame stands for (frame j itself in image
    mode; 0, f_t, 2 f_t, ... in video mode, latent frame j >= 1 covering the f_t frames up to it)."""
    n = latent_frames(mode, frames, temporal_factor)
    step = 1 if mode == "image" else temporal_factor
    return torch.arange(n, dtype=torch.long) * step


def latents_for(mode: str, vae, video: torch.Tensor) -> torch.Tensor:
    """Normalized latents (B, T', H', W', C) float32 of clips `video` (B, T, 3, H, W) in [-1, 1]
    as `mode` sees them; `frame_index(mode, T, vae.cfg.temporal_factor)` says which input frame
    each latent frame stands for."""
    _check_mode(mode)
    if video.dim() != 5:
        raise ValueError(f"latents_for expects clips (B, T, 3, H, W), got shape {tuple(video.shape)}")
    video = video.float()
    if mode == "video":
        return vae.encode(video, mode="video").float()
    B, T = video.shape[:2]
    z = vae.encode(frames_as_images(video), mode="image").float()
    return z.reshape(B, T, *z.shape[2:])


def frames_as_images(video: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) clips -> (B*T, 1, 3, H, W) one-frame clips, for the per-mode statistics."""
    return video.reshape(-1, 1, *video.shape[2:])
