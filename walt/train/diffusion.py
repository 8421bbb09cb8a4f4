"""Stage 2: WALT on normalized autoencoder latents (v-prediction, self-conditioning).

Video mode (V-WALT) trains on clips; image mode (I-WALT) on frames drawn independently from the
same clips. Both see their latents through `walt.data.modes.latents_for`. With
`train.match_tokens` (the default) I-WALT draws batch x T' frames per step, T' being the latent
frames of one clip, so both models see the same latent tokens (and FLOPs outside attention) per
step. `train.image_fraction` > 0 makes that share of V-WALT's steps image steps (the paper's
joint image-video training): batch x T' frames of the same clips, each a 1-frame video.
"""
import logging
import os
import sys

import torch

from walt.data.dataset import FrameDataset, build_dataset, clip_of
from walt.data.modes import latent_frames, latents_for
from walt.diffusion.media import write_mp4, write_png_grid
from walt.diffusion.objective import Diffusion, mix_seed
from walt.diffusion.sampler import ddim_sample
from walt.models.transformer import WALT
from walt.runs import load_autoencoder
from walt.train.loop import Task

log = logging.getLogger("walt.train")

_IMAGE_KEYS = 1 << 40  # keys of V-WALT's image-step frames: apart from every clip's key


class DiffusionTask(Task):
    def __init__(self, cfg, dist):
        if not cfg.autoencoder_run:
            raise ValueError("the diffusion stage needs autoencoder_run: the output directory of a `walt-train autoencoder` run")
        self.cfg, self.dist = cfg, dist
        self.vae = load_autoencoder(cfg.autoencoder_run, dist.device)
        self.diffusion = Diffusion(cfg.diffusion)
        self.model = WALT.from_seed(cfg.model, cfg.train.seed)
        self.mode = cfg.model.mode
        clips = build_dataset(cfg.data)
        T, _, H, W = clip_of(clips[0]).shape
        ae, m, tc = self.vae.cfg, cfg.model, cfg.train
        self.clip_latent_frames = latent_frames("video", T, ae.temporal_factor)
        grid = (latent_frames(self.mode, 1 if self.mode == "image" else T, ae.temporal_factor),
                H // ae.spatial_factor, W // ae.spatial_factor)
        if any(g > lim for g, lim in zip(grid, (1 if self.mode == "image" else m.input_size[0], *m.input_size[1:]))):
            raise ValueError(
                f"the autoencoder turns {T}x{H}x{W} clips into {'x'.join(map(str, grid))} latents, larger than "
                f"model.input_size {'x'.join(map(str, m.input_size))}; raise model.input_size or use smaller clips"
            )
        self.latent_shape = (*grid, ae.latent_channels)
        if not 0.0 <= tc.image_fraction <= 1.0 or (tc.image_fraction > 0 and self.mode == "image"):
            raise ValueError(f"train.image_fraction must be in [0, 1] and is for video mode only, got {tc.image_fraction}")
        image_mode = self.mode == "image"
        self.dataset = FrameDataset(clips, T) if image_mode else clips
        self.cached = tc.cache_latents
        if self.cached:
            if tc.image_fraction > 0:
                raise ValueError("train.cache_latents caches one mode's latents; it cannot be used with train.image_fraction > 0")
            self.dataset = self._encode_all(clips, image_mode)
            self.collate = torch.stack
        # Examples per step: I-WALT with matched tokens takes T' frames for each clip V-WALT takes.
        self.batch_size = tc.batch_size * (self.clip_latent_frames if image_mode and tc.match_tokens else 1)

    @torch.no_grad()
    def _encode_all(self, clips, image_mode, batch=16):
        """Every clip's latents as `latents_for` gives them, in the order of the uncached dataset: clips,
        or (I-WALT) frame j % T of clip j // T as a 1-frame latent."""
        parts = []
        for first in range(0, len(clips), batch):
            video = torch.stack([clip_of(clips[i]) for i in range(first, min(first + batch, len(clips)))])
            z = latents_for(self.mode, self.vae, video.to(self.dist.device))
            parts.append(z.reshape(-1, 1, *z.shape[2:]) if image_mode else z)
        return torch.cat(parts).cpu()

    def _image_step(self, step):
        f = self.cfg.train.image_fraction
        return f > 0 and mix_seed(self.cfg.train.seed, step, 3) < f * 2**63

    def _frames_of(self, video, keys):
        """V-WALT's image step: T' frames of each clip, drawn from (seed, key), as 1-frame videos,
        with keys of their own."""
        n, T = self.clip_latent_frames, video.shape[1]
        picks = [torch.randint(T, (n,), generator=torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, int(k), 4)))
                 for k in keys]
        frames = torch.stack([v[p] for v, p in zip(video, picks)]).reshape(-1, 1, *video.shape[2:])
        frame_keys = (_IMAGE_KEYS + keys[:, None] * n + torch.arange(n)).reshape(-1)
        return frames, frame_keys

    def loss(self, model, video, step, keys, raw):
        if self._image_step(step):
            video, keys = self._frames_of(video, keys)
        if self.cached:
            x0 = video  # the batch already holds the latents
        else:
            with torch.no_grad():  # fp32 targets even under bf16 autocast
                x0 = latents_for(self.mode, self.vae, video)
        # The self-conditioning estimate is a no-grad pass: the raw module, outside DDP and torch.compile.
        loss = self.diffusion.loss(model, x0, seed=self.cfg.train.seed, keys=keys, estimator=raw)  # keys stay on the CPU
        return loss, {}

    def tokens(self, video):
        """Latent tokens of one step's batch (an image step of V-WALT has as many as a clip step)."""
        T, H, W = self.latent_shape[:3]
        p = self.cfg.model.patch_size
        return video.shape[0] * T * (H // p) * (W // p)

    @torch.no_grad()
    def sample(self, model, step, out_dir):
        """DDIM samples decoded to pixels (rank 0): samples/step_XXXXXX.png, a grid of every frame,
        and for V-WALT also .mp4 (I-WALT generates single images)."""
        if not self.dist.main or self.cfg.train.num_samples < 1:
            return
        was_training = model.training
        model.eval()
        g = torch.Generator().manual_seed(self.cfg.train.seed + 1)
        noise = torch.randn((self.cfg.train.num_samples, *self.latent_shape), generator=g).to(self.dist.device)
        z = ddim_sample(model, noise, self.diffusion.alphas_cumprod, self.cfg.diffusion.sample_steps,
                        progress=sys.stderr.isatty())
        video = self.vae.decode(z, mode=self.mode)
        model.train(was_training)
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        stem = os.path.join(out_dir, "samples", f"step_{step:06d}")
        write_png_grid(stem + ".png", video)
        if video.shape[1] > 1:
            write_mp4(stem + ".mp4", video)
        log.info("wrote samples %s.{png%s}", stem, ",mp4" if video.shape[1] > 1 else "")

    def finish(self, model, ema, step, out_dir):
        self.sample(ema if ema is not None else model, step, out_dir)


make_task = DiffusionTask
