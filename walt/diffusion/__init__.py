"""Diffusion: noise schedules, the noising/objective path, samplers."""
from walt.diffusion.schedules import alphas_cumprod, make_betas, make_schedule, rescale_zero_terminal_snr

__all__ = ["alphas_cumprod", "make_betas", "make_schedule", "rescale_zero_terminal_snr"]
