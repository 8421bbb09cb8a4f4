"""β schedules for discrete-time diffusion, in float64.

WALT uses the linear schedule (β from 1e-4 to 0.02 over 1000 steps) with the zero-terminal-SNR
rescale of Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"),
so the last step is pure noise and v-prediction sees the whole signal range.
"""
import math

import torch


def make_betas(name="linear", num_steps=1000, beta_start=1e-4, beta_end=0.02):
    """β_1..β_T for 'linear', 'scaled_linear' (Stable Diffusion) or 'cosine' (Nichol & Dhariwal)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    if name == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if name == "cosine":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999) for i in range(num_steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {name!r}; expected 'linear', 'scaled_linear' or 'cosine'")


def rescale_zero_terminal_snr(betas):
    """Shift and scale sqrt(ᾱ) so that ᾱ_T = 0 while ᾱ_1 is unchanged."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def alphas_cumprod(betas):
    """ᾱ_t = prod_{s<=t} (1 - β_s)."""
    return torch.cumprod(1 - betas, dim=0)


def make_schedule(name="linear", num_steps=1000, beta_start=1e-4, beta_end=0.02, zero_terminal_snr=True):
    """ᾱ table (float64, length num_steps) for the named schedule; WALT's default."""
    betas = make_betas(name, num_steps, beta_start, beta_end)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return alphas_cumprod(betas)
