"""Training: the shared loop, the autoencoder and diffusion stages, checkpoints, DDP, data protocol."""
