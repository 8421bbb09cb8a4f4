"""Causal 3D CNN VAE (MAGVIT-v2 style, continuous KL-regularized latent).

Every temporal convolution is padded only in the past (with copies of the first frame), every
normalization is per frame, and temporal downsampling keeps frame 0 on its own: a clip of
1 + f_t*k frames becomes 1 + k latent frames, and latent frame j depends only on input frames
up to f_t*j. An image is therefore a 1-frame video through the same path, and the first latent
of any clip is exactly the latent of its first frame as an image.

Public tensors use the project's layouts: videos (B, T, 3, H, W) in [-1, 1], images (B, 3, H, W),
latents (B, T', H', W', C) channels-last. Conv3d layout (B, C, T, H, W) stays inside.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AutoencoderConfig:
    latent_channels: int = 8
    base_channels: int = 64
    channel_mult: tuple = (1, 2, 4, 4)  # one level per entry; a downsample between levels
    num_res_blocks: int = 2
    spatial_factor: int = 8  # 4 or 8
    temporal_factor: int = 4  # 1, 2 or 4
    groups: int = 32


def _log2(n, what):
    k = int(round(math.log2(n))) if n > 0 else -1
    if k < 0 or 2**k != n:
        raise ValueError(f"{what} must be a power of two, got {n}")
    return k


class CausalConv3d(nn.Module):
    """Conv3d whose output at frame t sees input frames <= t only (past padded with frame 0)."""

    def __init__(self, cin, cout, kernel=3, stride=(1, 1, 1)):
        super().__init__()
        self.pad_t = kernel - 1
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, kernel // 2, kernel // 2))

    def forward(self, x):
        if self.pad_t:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.pad_t, -1, -1), x], dim=2)
        return self.conv(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over each frame separately: statistics over time would leak the future."""

    def forward(self, x):
        B, C, T, H, W = x.shape
        y = F.group_norm(x.transpose(1, 2).reshape(B * T, C, H, W), self.num_groups, self.weight, self.bias, self.eps)
        return y.reshape(B, T, C, H, W).transpose(1, 2)


def _norm(ch, groups):
    return FrameGroupNorm(math.gcd(groups, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = _norm(cout, groups), CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 causal conv; in time, kernel 3 with 2 past pads maps 1+2k frames to 1+k."""

    def __init__(self, ch, temporal):
        super().__init__()
        self.conv = CausalConv3d(ch, ch, stride=(2 if temporal else 1, 2, 2))

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Inverse of Downsample: 1+k frames -> 1+2k (depth-to-time, dropping the duplicate of frame 0)."""

    def __init__(self, ch, temporal):
        super().__init__()
        self.temporal = temporal
        if temporal:
            self.time_conv = CausalConv3d(ch, 2 * ch)
        self.conv = CausalConv3d(ch, ch)

    def forward(self, x):
        if self.temporal:
            B, C, T, H, W = x.shape
            x = self.time_conv(x).reshape(B, 2, C, T, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)
            x = x[:, :, 1:]  # latent frame 0 stands for input frame 0 alone
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x)


def _level_plan(cfg):
    """Which of the len(channel_mult)-1 level transitions downsample in time (the last ones)."""
    n_s = _log2(cfg.spatial_factor, "spatial_factor")
    n_t = _log2(cfg.temporal_factor, "temporal_factor")
    n_levels = len(cfg.channel_mult)
    if cfg.num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be at least 1, got {cfg.num_res_blocks}")
    if n_s != n_levels - 1:
        raise ValueError(
            f"spatial_factor {cfg.spatial_factor} needs {n_s + 1} channel_mult entries, got {len(cfg.channel_mult)}"
        )
    if n_t > n_s:
        raise ValueError(f"temporal_factor {cfg.temporal_factor} may not exceed spatial_factor {cfg.spatial_factor}")
    return [i >= n_s - n_t for i in range(n_s)]


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mult]
        temporal = _level_plan(cfg)
        self.conv_in = CausalConv3d(3, chs[0])
        layers, cin = [], chs[0]
        for i, ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, ch, cfg.groups))
                cin = ch
            if i < len(chs) - 1:
                layers.append(Downsample(ch, temporal[i]))
        layers += [ResBlock(cin, cin, cfg.groups), ResBlock(cin, cin, cfg.groups)]
        self.layers = nn.Sequential(*layers)
        self.norm_out = _norm(cin, cfg.groups)
        self.conv_out = CausalConv3d(cin, 2 * cfg.latent_channels)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.layers(self.conv_in(x)))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mult][::-1]
        temporal = _level_plan(cfg)[::-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, chs[0])
        layers, cin = [ResBlock(chs[0], chs[0], cfg.groups), ResBlock(chs[0], chs[0], cfg.groups)], chs[0]
        for i, ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, ch, cfg.groups))
                cin = ch
            if i < len(chs) - 1:
                layers.append(Upsample(ch, temporal[i]))
        self.layers = nn.Sequential(*layers)
        self.norm_out = _norm(cin, cfg.groups)
        self.conv_out = CausalConv3d(cin, 3)

    def forward(self, z):
        return self.conv_out(F.silu(self.norm_out(self.layers(self.conv_in(z)))))


LATENT_MODES = ("video", "image")  # rows of the latent statistics


def _mode_row(mode):
    if mode not in LATENT_MODES:
        raise ValueError(f"mode must be one of {LATENT_MODES}, got {mode!r}")
    return LATENT_MODES.index(mode)


class CausalVAE(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Per-channel statistics of the posterior means over the training data, one row per
        # mode (LATENT_MODES): clip latents for V-WALT, single-frame latents for I-WALT, which
        # differ (a 4-frame latent is not a 1-frame one), so the same t is the same SNR for
        # both. Set by `set_latent_stats` after training; saved with the weights so the
        # transformer's input normalization travels with the autoencoder.
        self.register_buffer("latent_mean", torch.zeros(len(LATENT_MODES), cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(len(LATENT_MODES), cfg.latent_channels))

    # -- layout checks -------------------------------------------------------------------------
    def _to_conv_layout(self, x):
        """(B, T, 3, H, W) video or (B, 3, H, W) image -> (B, 3, T, H, W), validated."""
        if x.dim() == 4:
            x = x[:, None]
        if x.dim() != 5 or x.shape[2] != 3:
            raise ValueError(
                f"autoencoder input must be a video (B, T, 3, H, W) or an image (B, 3, H, W), got shape {tuple(x.shape)}"
            )
        T, H, W = x.shape[1], x.shape[3], x.shape[4]
        f_t, f_s = self.cfg.temporal_factor, self.cfg.spatial_factor
        if (T - 1) % f_t:
            raise ValueError(f"clip length must be 1 + a multiple of {f_t} frames (e.g. {1 + 4 * f_t}), got {T}")
        if H % f_s or W % f_s:
            raise ValueError(f"frame size must be a multiple of {f_s} pixels, got {H}x{W}")
        return x.transpose(1, 2)

    # -- encoding ------------------------------------------------------------------------------
    def encode_dist(self, x):
        """Posterior (mean, logvar), each (B, T', H', W', C), of a video or image."""
        h = self.encoder(self._to_conv_layout(x)).permute(0, 2, 3, 4, 1)
        mean, logvar = h.chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x, mode=None, sample=False, generator=None):
        """Latent (B, T', H', W', C): the posterior mean (or a sample) of a video or image, raw, or
        normalized with `mode`'s statistics ("video" or "image"). How each mode encodes a clip
        is `walt.data.modes.latents_for`'s to decide, not this method's."""
        mean, logvar = self.encode_dist(x)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + (0.5 * logvar).exp() * eps
        return z if mode is None else (z - self.latent_mean[_mode_row(mode)]) / self.latent_std[_mode_row(mode)]

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, z, mode=None):
        """(B, T', H', W', C) latent -> (B, T, 3, H, W) video; `mode` names the statistics a
        normalized latent was made with (None: z is raw)."""
        if z.dim() != 5 or z.shape[-1] != self.cfg.latent_channels:
            raise ValueError(
                f"latent must be (B, T', H', W', {self.cfg.latent_channels}) channels-last, got shape {tuple(z.shape)}"
            )
        if mode is not None:
            z = z * self.latent_std[_mode_row(mode)] + self.latent_mean[_mode_row(mode)]
        return self.decoder(z.permute(0, 4, 1, 2, 3)).transpose(1, 2)

    def forward(self, x, generator=None):
        """Training pass: (reconstruction (B, T, 3, H, W), posterior mean, posterior logvar)."""
        mean, logvar = self.encode_dist(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + (0.5 * logvar).exp() * eps
        return self.decode(z), mean, logvar

    @torch.no_grad()
    def set_latent_stats(self, mode, mean, std):
        self.latent_mean[_mode_row(mode)] = mean
        self.latent_std[_mode_row(mode)] = std.clamp_min(1e-6)


def kl_loss(mean, logvar):
    """KL(q(z|x) || N(0, I)) averaged per latent element (the weight is set per element too)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


class PatchDiscriminator3D(nn.Module):
    """Small 3D patch discriminator: real/fake logits for overlapping spatiotemporal patches."""

    def __init__(self, channels=64, num_layers=3):
        super().__init__()
        layers, cin = [nn.Conv3d(3, channels, (3, 4, 4), stride=(1, 2, 2), padding=1), nn.LeakyReLU(0.2)], channels
        for i in range(1, num_layers):
            cout = channels * 2**i
            layers += [nn.Conv3d(cin, cout, (3, 4, 4), stride=(1, 2, 2), padding=1), nn.GroupNorm(math.gcd(32, cout), cout), nn.LeakyReLU(0.2)]
            cin = cout
        layers.append(nn.Conv3d(cin, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, video):
        return self.net(video.transpose(1, 2))  # (B, T, 3, H, W) -> Conv3d layout
