"""The learning-rate schedule of every optimiser walt runs: diffusion and autoencoder training and
the probe readouts. A module of its own so the probes can use it without the training stack."""
import math


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): linear warmup
    over ``warmup`` steps ((step + 1) / warmup), then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
