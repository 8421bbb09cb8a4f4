"""Noising and the v-prediction objective with self-conditioning.

Every random draw of a training example (its timestep, whether it is self-conditioned, its
noise) is a function of (run seed, the example's global key) only. Batches split over any
number of ranks, or a run resumed from a checkpoint, therefore see exactly the same noise.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from walt.diffusion.schedules import make_schedule
from walt.ops.noise import coefficients
from walt.ops.unfused import per_sample_randn
from walt.seeding import mix_seed  # noqa: F401  (re-exported: the loop and the tasks seed from it)


@dataclass
class DiffusionConfig:
    num_steps: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = True
    self_cond_prob: float = 0.9
    noise_backend: str = "fused"  # "fused" (walt.ops.add_noise) or "torch" (torch.randn + arithmetic)
    sample_steps: int = 50


class Diffusion:
    """The forward process, the v-prediction training loss and conversions between targets."""

    def __init__(self, cfg: DiffusionConfig):
        if cfg.noise_backend not in ("fused", "torch"):
            raise ValueError(f"diffusion.noise_backend must be 'fused' or 'torch', got {cfg.noise_backend!r}")
        self.cfg = cfg
        self.alphas_cumprod = make_schedule(
            cfg.schedule, cfg.num_steps, cfg.beta_start, cfg.beta_end, zero_terminal_snr=cfg.zero_terminal_snr
        )  # float64, on CPU; moved per use

    def _coeffs(self, t, like):
        """sqrt(ab[t]), sqrt(1 - ab[t]) computed in float64, shaped and typed to broadcast over `like`."""
        return coefficients(self.alphas_cumprod.to(like.device), t, like.dim(), like.dtype)

    def add_noise(self, x0, t, seed=0, keys=None, noise=None):
        """(x_t, v target) for clean x0 at per-sample timesteps t."""
        if keys is None:
            keys = torch.arange(x0.shape[0])
        if len(keys) != x0.shape[0]:
            raise ValueError(f"keys must hold one key per example ({x0.shape[0]}), got {len(keys)}")
        if self.cfg.noise_backend == "fused":
            from walt.ops import add_noise  # imported late: only the fused path needs walt._C ops

            ab = self.alphas_cumprod.to(x0.device)  # float64; the op casts it to x0's compute dtype
            return add_noise(x0, t, ab, seed=seed % 2**64, keys=keys.to(x0.device), noise=noise, target="v")
        if noise is None:
            noise = per_sample_randn(x0.shape[1:], seed, keys, dtype=x0.dtype, device=x0.device)
        a, s = self._coeffs(t, x0)
        return a * x0 + s * noise, a * noise - s * x0

    def x0_from_v(self, x_t, t, v):
        a, s = self._coeffs(t, x_t)
        return a * x_t - s * v

    def draw(self, seed, keys, device="cpu"):
        """Per-example timesteps (B,) int64 and self-conditioning flags (B,) bool."""
        t, sc = [], []
        for k in keys:
            g = torch.Generator().manual_seed(mix_seed(seed, int(k), 1))
            t.append(torch.randint(0, self.cfg.num_steps, (), generator=g))
            sc.append(torch.rand((), generator=g) < self.cfg.self_cond_prob)
        return torch.stack(t).to(device), torch.stack(sc).to(device)

    def loss(self, model, x0, seed, keys, y=None, estimator=None):
        """Mean squared v error with self-conditioning (Chen et al. 2022).

        For the flagged examples a first pass without gradient estimates x0 from zeros; the
        second pass sees that estimate on the channel axis. `estimator` runs the first pass
        (pass the unwrapped module under DDP); it defaults to `model`.
        """
        if len(keys) != x0.shape[0]:
            raise ValueError(f"keys must hold one key per example ({x0.shape[0]}), got {len(keys)}")
        t, use_sc = self.draw(seed, keys, x0.device)
        x_t, target = self.add_noise(x0, t, seed=seed, keys=keys)
        self_cond = torch.zeros_like(x0)
        if use_sc.any():
            with torch.no_grad():
                v = (estimator or model)(x_t, t, self_cond=self_cond, y=y)
                est = self.x0_from_v(x_t, t, v.to(x_t.dtype))
            self_cond = torch.where(use_sc.reshape(-1, *([1] * (x0.dim() - 1))), est, self_cond)
        pred = model(x_t, t, self_cond=self_cond, y=y)
        return F.mse_loss(pred.float(), target.float())
