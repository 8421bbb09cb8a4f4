"""Stage 1: the causal VAE (reconstruction + KL, optional 3D patch GAN), then latent statistics."""
import logging

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from walt.models.autoencoder import CausalVAE, PatchDiscriminator3D, kl_loss
from walt.data.dataset import build_dataset
from walt.data.modes import MODES, frames_as_images
from walt.train import distributed
from walt.train.data import collate
from walt.train.loop import Task

log = logging.getLogger("walt.train")


class AutoencoderTask(Task):
    def __init__(self, cfg, dist):
        if cfg.ae_loss.recon not in ("l1", "l2"):
            raise ValueError(f"ae_loss.recon must be 'l1' or 'l2', got {cfg.ae_loss.recon!r}")
        self.cfg, self.dist = cfg, dist
        self.model = CausalVAE(cfg.autoencoder)
        self.dataset = build_dataset(cfg.data)
        self.disc = self.disc_opt = None
        if cfg.ae_loss.disc_weight > 0:
            self.disc = PatchDiscriminator3D(cfg.ae_loss.disc_channels).to(dist.device)
            self.disc_train = DDP(self.disc) if dist.enabled else self.disc
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.train.lr, betas=(0.5, 0.9))
        self._pair = None

    def _adversarial(self, step):
        return self.disc is not None and step >= self.cfg.ae_loss.disc_start

    def loss(self, model, video, step, keys, raw):
        lc = self.cfg.ae_loss
        recon, mean, logvar = model(video)
        rec = (recon - video).abs().mean() if lc.recon == "l1" else F.mse_loss(recon, video)
        kl = kl_loss(mean, logvar)
        total = rec + lc.kl_weight * kl
        logs = {"recon": rec.detach(), "kl": kl.detach()}
        if self._adversarial(step):
            self.disc.requires_grad_(False)
            g = -self.disc(recon).mean()  # hinge generator loss
            self.disc.requires_grad_(True)
            total = total + lc.disc_weight * g
            logs["gen"] = g.detach()
            self._pair = (video, recon.detach())
        return total, logs

    def after_step(self, video, step):
        if not self._adversarial(step) or self._pair is None:
            return {}
        real, fake = self._pair
        d = F.relu(1 - self.disc_train(real)).mean() + F.relu(1 + self.disc_train(fake)).mean()
        self.disc_opt.zero_grad(set_to_none=True)
        d.backward()
        self.disc_opt.step()
        self._pair = None
        return {"disc": d.detach()}

    def tokens(self, video):
        return video[0].numel() // 3 * video.shape[0]  # pixels per step

    def extra_state(self):
        if self.disc is None:
            return {}
        return {"disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict()}

    def load_extra_state(self, state):
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])

    @torch.no_grad()
    def finish(self, model, ema, step, out_dir):
        """Per-channel mean/std of the posterior means over (a share of) the training data, for each
        mode as `latents_for` encodes it: clip latents (V-WALT) and single-frame latents (I-WALT)."""
        n_batches, B = self.cfg.ae_loss.stats_batches, self.cfg.train.batch_size // self.dist.world
        C = self.cfg.autoencoder.latent_channels
        acc = torch.zeros(len(MODES), 3, C, dtype=torch.float64, device=self.dist.device)
        model.eval()
        n = len(self.dataset)
        for b in range(n_batches):
            first = (b * self.dist.world + self.dist.rank) * B
            video = collate([self.dataset[(first + i) % n] for i in range(B)]).to(self.dist.device)
            for m, mode in enumerate(MODES):
                x = video if mode == "video" else frames_as_images(video)
                z = model.encode(x).reshape(-1, C).double()  # raw (unnormalized) posterior means
                acc[m] += torch.stack([torch.full_like(z[0], z.shape[0]), z.sum(0), z.square().sum(0)])
        model.train()
        acc = distributed.all_reduce_sum(acc)
        for m, mode in enumerate(MODES):
            count, s1, s2 = acc[m]
            mean = s1 / count
            std = (s2 / count - mean.square()).clamp_min(0).sqrt()
            for net in (model, ema):
                if net is not None:
                    net.set_latent_stats(mode, mean.float(), std.float())
            log.info("%s latent statistics over %d latents: mean %s std %s", mode, int(count[0]),
                     [round(x, 3) for x in mean.tolist()], [round(x, 3) for x in std.tolist()])


make_task = AutoencoderTask
