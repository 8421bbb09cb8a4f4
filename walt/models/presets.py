"""Named model sizes.

Transformer presets give depth x width x heads (and, for "cpu", the small windows and latent
grid of the demo). WALT-L (24 x 1024 x 16, ~300M) and WALT-XL (28 x 1152 x 16, ~460M) are the
paper's; S and B follow DiT's widths; G (~1.9B) is the top of the study's 284M-1.9B range.
All but "cpu" use the paper's latent grid: 17 frames of 128x128 -> 5 x 16 x 16 x 8.
"""
TRANSFORMER_PRESETS = {
    "cpu": dict(depth=4, width=64, heads=4, input_size=(5, 8, 8), spatial_window=(1, 8, 8), spatiotemporal_window=(5, 4, 4)),
    "S": dict(depth=12, width=384, heads=6),
    "B": dict(depth=12, width=768, heads=12),
    "L": dict(depth=24, width=1024, heads=16),
    "XL": dict(depth=28, width=1152, heads=16),
    "G": dict(depth=48, width=1792, heads=16),
}

# The demo autoencoder compresses 17 x 32 x 32 clips 4x in space and time; the paper's 8x/4x.
AUTOENCODER_PRESETS = {
    "cpu": dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, spatial_factor=4, temporal_factor=4),
    "paper": dict(base_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2, spatial_factor=8, temporal_factor=4),
}
