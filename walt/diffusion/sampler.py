"""DDIM sampling (η = 0) for a v-prediction model with self-conditioning."""
import torch
from tqdm.auto import tqdm

from walt.ops.noise import coefficients


def ddim_timesteps(num_steps, sample_steps):
    """Trailing spacing (Lin et al. 2024): starts at the last step, where zero-terminal SNR gives
    pure noise, and ends near t = 0."""
    if not 1 <= sample_steps <= num_steps:
        raise ValueError(f"sample_steps must be between 1 and {num_steps}, got {sample_steps}")
    ratio = num_steps / sample_steps
    return [int(round(num_steps - i * ratio)) - 1 for i in range(sample_steps)]


@torch.no_grad()
def ddim_sample(model, noise, alphas_cumprod, sample_steps=50, self_cond=True, y=None, progress=False):
    """Denoise `noise` (pure noise at the last timestep) to x0 in `sample_steps` DDIM steps.

    model(x_t, t, self_cond=..., y=...) returns v. Each step forms x0 = a·x_t − s·v and
    ε = s·x_t + a·v, then moves to the next timestep along the deterministic DDIM path; the x0
    estimate is fed back as the self-conditioning input.
    """
    steps = ddim_timesteps(len(alphas_cumprod), sample_steps)
    a, s = (c.tolist() for c in coefficients(alphas_cumprod.to(torch.float64), torch.tensor(steps)))
    a, s = a + [1.0], s + [0.0]  # the path ends at ab = 1: x0 itself
    x = noise
    x0 = torch.zeros_like(x)
    for i, t in enumerate(tqdm(steps, desc="ddim", disable=not progress, leave=False)):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        v = model(x, tt, self_cond=x0 if self_cond else torch.zeros_like(x), y=y).to(x.dtype)
        x0 = a[i] * x - s[i] * v
        eps = s[i] * x + a[i] * v
        x = a[i + 1] * x0 + s[i + 1] * eps
    return x
