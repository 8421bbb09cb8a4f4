"""Stage 2: WALT on normalized autoencoder latents (v-prediction, self-conditioning).

Video mode (V-WALT) trains on clips. Image mode (I-WALT) trains on frames drawn independently
from the same clips, each encoded as an image (a 1-frame video).
"""
import logging
import os
import sys

import torch

from walt.diffusion.media import write_mp4, write_png_grid
from walt.diffusion.objective import Diffusion
from walt.diffusion.sampler import ddim_sample
from walt.models.transformer import WALT
from walt.train.checkpoint import load_autoencoder
from walt.train.data import FrameDataset, build_dataset, clip_of

log = logging.getLogger("walt.train")


class DiffusionTask:
    def __init__(self, cfg, dist):
        if not cfg.autoencoder_run:
            raise ValueError("the diffusion stage needs autoencoder_run: the output directory of a `walt-train autoencoder` run")
        self.cfg, self.dist = cfg, dist
        self.vae = load_autoencoder(cfg.autoencoder_run, dist.device)
        self.diffusion = Diffusion(cfg.diffusion)
        self.model = WALT(cfg.model)
        clips = build_dataset(cfg.data)
        T, _, H, W = clip_of(clips[0]).shape
        ae, m = self.vae.cfg, cfg.model
        self.image_mode = m.mode == "image"
        grid = (1 if self.image_mode else (T - 1) // ae.temporal_factor + 1, H // ae.spatial_factor, W // ae.spatial_factor)
        if any(g > lim for g, lim in zip(grid, (1 if self.image_mode else m.input_size[0], *m.input_size[1:]))):
            raise ValueError(
                f"the autoencoder turns {T}x{H}x{W} clips into {'x'.join(map(str, grid))} latents, larger than "
                f"model.input_size {'x'.join(map(str, m.input_size))}; raise model.input_size or use smaller clips"
            )
        self.dataset = FrameDataset(clips, T) if self.image_mode else clips
        self.latent_shape = None

    @torch.no_grad()
    def encode(self, video):
        z = self.vae.encode(video.float()).float()  # fp32 targets even under bf16 autocast; image mode: 1 latent frame
        self.latent_shape = z.shape[1:]
        return z

    def loss(self, model, video, step, keys):
        x0 = self.encode(video)
        raw = model.module if hasattr(model, "module") else model
        raw = getattr(raw, "_orig_mod", raw)
        loss = self.diffusion.loss(model, x0, seed=self.cfg.train.seed, keys=keys, estimator=raw)  # keys stay on the CPU
        return loss, {}

    def after_step(self, video, step):
        return {}

    def tokens(self, video):
        T, H, W = self.latent_shape[:3]
        p = self.cfg.model.patch_size
        return video.shape[0] * T * (H // p) * (W // p)

    def extra_state(self):
        return {}

    def load_extra_state(self, state):
        pass

    @torch.no_grad()
    def sample(self, model, step, out_dir):
        """DDIM samples decoded to pixels: samples/step_XXXXXX.mp4 and .png (rank 0)."""
        if not self.dist.main or self.latent_shape is None or self.cfg.train.num_samples < 1:
            return
        was_training = model.training
        model.eval()
        g = torch.Generator().manual_seed(self.cfg.train.seed + 1)
        noise = torch.randn((self.cfg.train.num_samples, *self.latent_shape), generator=g).to(self.dist.device)
        z = ddim_sample(model, noise, self.diffusion.alphas_cumprod, self.cfg.diffusion.sample_steps,
                        progress=sys.stderr.isatty())
        video = self.vae.decode(z)
        model.train(was_training)
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        stem = os.path.join(out_dir, "samples", f"step_{step:06d}")
        write_png_grid(stem + ".png", video)
        if video.shape[1] > 1:
            write_mp4(stem + ".mp4", video)
        log.info("wrote samples %s.{png%s}", stem, ",mp4" if video.shape[1] > 1 else "")

    def finish(self, model, ema, step, out_dir):
        self.sample(ema if ema is not None else model, step, out_dir)


def make_task(cfg, dist):
    return DiffusionTask(cfg, dist)
