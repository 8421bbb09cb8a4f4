"""Diffusion: noise schedules, the noising/objective path, the DDIM sampler, sample export."""
from walt.diffusion.objective import Diffusion, DiffusionConfig
from walt.diffusion.sampler import ddim_sample, ddim_timesteps
from walt.diffusion.schedules import alphas_cumprod, make_betas, make_schedule, rescale_zero_terminal_snr

__all__ = [
    "Diffusion",
    "DiffusionConfig",
    "alphas_cumprod",
    "ddim_sample",
    "ddim_timesteps",
    "make_betas",
    "make_schedule",
    "rescale_zero_terminal_snr",
]
