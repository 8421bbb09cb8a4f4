"""WALT: a window-attention latent transformer for video (V-WALT) and image (I-WALT) diffusion.

Tokens are (B, T, H, W, width) channels-last, the layout of walt's window-attention op, so the
model never transposes between blocks. Blocks alternate a spatial window (1 x h x w) and a
spatiotemporal window (t x h x w). In image mode the spatiotemporal blocks use a per-frame
window (1 x h x w), use only the temporal-offset-0 slice of their relative position table and
every frame takes temporal position 0: no information can cross frames, and the parameter set
is the one V-WALT has.

Conditioning is AdaLN-LoRA (WALT, Gupta et al. 2023): block 1 regresses the six modulation
vectors from the conditioning embedding; every later block adds its own rank-r correction.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from walt.ops.unfused import window_attention_sdpa


@dataclass
class TransformerConfig:
    latent_channels: int = 8
    input_size: tuple = (5, 16, 16)  # largest latent grid (T', H', W'): sizes the position tables
    patch_size: int = 1
    depth: int = 24
    width: int = 1024
    heads: int = 16
    mlp_ratio: float = 4.0
    spatial_window: tuple = (1, 16, 16)
    spatiotemporal_window: tuple = (5, 8, 8)
    lora_rank: int = 2
    num_classes: int = 0  # 0: unconditional; otherwise an extra "null" label is added
    mode: str = "video"  # "video" (V-WALT) or "image" (I-WALT)
    attention_backend: str = "fused"  # "fused" (walt.ops.window_attention) or "torch" (partition + SDPA)
    qk_norm: bool = True


def window_attention(q, k, v, window, rel_pos_bias, backend):
    if backend == "fused":
        from walt.ops import window_attention as fused  # imported late: only the fused path needs walt._C ops

        return fused(q, k, v, window, rel_pos_bias=rel_pos_bias)
    if backend == "torch":
        return window_attention_sdpa(q, k, v, window, rel_pos_bias=rel_pos_bias)
    raise ValueError(f"model.attention_backend must be 'fused' or 'torch', got {backend!r}")


def modulate(x, shift, scale):
    return torch.addcmul(shift, x, 1 + scale)  # one pass over x (and one in backward), not three


class Attention(nn.Module):
    def __init__(self, width, heads, window, qk_norm):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads, self.head_dim, self.window = heads, width // heads, tuple(window)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        # QK-norm keeps attention logits bounded at large width (ViT-22B); RMS over head_dim.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        wt, wh, ww = self.window
        self.rel_pos_bias = nn.Parameter(torch.zeros(heads, 2 * wt - 1, 2 * wh - 1, 2 * ww - 1))

    def forward(self, x, image_mode, backend):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)  # views, unit stride on d
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)  # under autocast the norms may return fp32
        window, bias = self.window, self.rel_pos_bias
        if image_mode and window[0] > 1:
            # Per-frame windows: keep the table, use its temporal-offset-0 slice.
            wt = window[0]
            window, bias = (1, *window[1:]), bias[:, wt - 1 : wt].contiguous()
        o = window_attention(q, k, v, window, bias, backend)
        return self.proj(o.flatten(-2))


class Block(nn.Module):
    def __init__(self, cfg, window, lora):
        super().__init__()
        d = cfg.width
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.heads, window, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        # Exact (erf) GELU: on GPUs either form is memory-bound; on CPUs the tanh approximation
        # costs 3x as much (torch 2.13, AVX-512).
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        if lora:  # rank-r correction W_b W_a c to block 1's modulation
            self.lora_a = nn.Linear(d, cfg.lora_rank, bias=False)
            self.lora_b = nn.Linear(cfg.lora_rank, 6 * d, bias=False)
            nn.init.zeros_(self.lora_b.weight)
        else:
            self.lora_a = self.lora_b = None

    def modulation(self, base, c):
        return base if self.lora_a is None else base + self.lora_b(self.lora_a(c))

    def forward(self, x, mod, image_mode, backend):
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None, None, None] for m in mod.chunk(6, dim=-1))
        x = torch.addcmul(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1), image_mode, backend))
        return torch.addcmul(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))


class TimestepEmbedder(nn.Module):
    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class WALT(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.mode not in ("video", "image"):
            raise ValueError(f"mode must be 'video' or 'image', got {cfg.mode!r}")
        self.cfg = cfg
        c, p, d = cfg.latent_channels, cfg.patch_size, cfg.width
        T, H, W = cfg.input_size
        if H % p or W % p:
            raise ValueError(f"input_size {cfg.input_size} must be divisible by patch_size {p} in space")
        self.x_embed = nn.Linear(2 * c * p * p, d)  # noisy latent concatenated with the self-cond estimate
        self.pos_spatial = nn.Parameter(torch.randn(H // p, W // p, d) * 0.02)
        self.pos_temporal = nn.Parameter(torch.randn(T, 1, 1, d) * 0.02)
        self.t_embed = TimestepEmbedder(d)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # block 1's (shift, scale, gate) x 2
        windows = (cfg.spatial_window, cfg.spatiotemporal_window)
        self.blocks = nn.ModuleList(Block(cfg, windows[i % 2], lora=i > 0) for i in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final_proj = nn.Linear(d, p * p * c)
        self._init_weights()

    @classmethod
    def from_seed(cls, cfg: TransformerConfig, seed: int):
        """A freshly initialized WALT whose weights depend only on (cfg, seed): a run's initial
        weights, and so the untrained control of the feature dumps."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(cfg)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.device.type != "meta":
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:
            if blk.lora_b is not None:
                nn.init.zeros_(blk.lora_b.weight)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        # adaLN-zero: every block starts as the identity and the output as zero (DiT).
        for lin in (self.ada[1], self.final_ada[1], self.final_proj):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # -- helpers -------------------------------------------------------------------------------
    def _check(self, x):
        c, p = self.cfg.latent_channels, self.cfg.patch_size
        if x.dim() != 5 or x.shape[-1] != c:
            raise ValueError(f"WALT input must be a latent (B, T', H', W', {c}) channels-last, got shape {tuple(x.shape)}")
        T, H, W = x.shape[1:4]
        Tm, Hm, Wm = self.cfg.input_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} must be divisible by patch_size {p}")
        if H > Hm or W > Wm or (self.cfg.mode == "video" and T > Tm):
            raise ValueError(f"latent grid {T}x{H}x{W} exceeds the model's input_size {Tm}x{Hm}x{Wm}")

    def patchify(self, x):
        B, T, H, W, C = x.shape
        p = self.cfg.patch_size
        x = x.reshape(B, T, H // p, p, W // p, p, C).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(B, T, H // p, W // p, p * p * C)

    def unpatchify(self, x):
        B, T, h, w, _ = x.shape
        p, C = self.cfg.patch_size, self.cfg.latent_channels
        x = x.reshape(B, T, h, w, p, p, C).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(B, T, h * p, w * p, C)

    def _embed(self, x, t, self_cond, y):
        self._check(x)
        if self_cond is None:
            self_cond = torch.zeros_like(x)
        h = self.x_embed(self.patchify(torch.cat([x, self_cond], dim=-1)))
        T, Hp, Wp = h.shape[1:4]
        pos_t = self.pos_temporal[:T] if self.cfg.mode == "video" else self.pos_temporal[:1]  # image: every frame is frame 0
        h = h + self.pos_spatial[:Hp, :Wp] + pos_t
        c = self.t_embed(t)
        if self.y_embed is not None:
            if y is None:
                y = torch.full_like(t, self.cfg.num_classes)  # the null label
            c = c + self.y_embed(y)
        return h, c

    def _run_blocks(self, h, c, taps=(), stop=None):
        """Blocks 0..stop (all by default): (final tokens, {i: tokens after block i for i in taps})."""
        base = self.ada(c)
        image_mode, backend = self.cfg.mode == "image", self.cfg.attention_backend
        ac = F.silu(c)
        tapped = {}
        for i, blk in enumerate(self.blocks[: None if stop is None else stop + 1]):
            h = blk(h, blk.modulation(base, ac), image_mode, backend)
            if i in taps:
                tapped[i] = h
        return h, tapped

    # -- public --------------------------------------------------------------------------------
    def forward(self, x, t, self_cond=None, y=None):
        """x: noisy latent (B, T', H', W', C); t: (B,) timesteps; self_cond: previous x0 estimate
        or None (zeros); y: (B,) class labels or None. Returns the v-prediction, shaped like x."""
        h, c = self._embed(x, t, self_cond, y)
        h, _ = self._run_blocks(h, c)
        shift, scale = self.final_ada(c)[:, None, None, None].chunk(2, dim=-1)
        return self.unpatchify(self.final_proj(modulate(self.final_norm(h), shift, scale)))

    def forward_features(self, x, t, blocks, self_cond=None, y=None):
        """Outputs of the requested blocks (0-based; negative counts from the end) in one pass:
        {block: (B, T', H'/p, W'/p, width)}. Stops after the deepest requested block."""
        if not blocks:
            raise ValueError("forward_features needs at least one block index")
        for b in blocks:
            if not -self.cfg.depth <= b < self.cfg.depth:
                raise ValueError(f"block {b} is out of range for a {self.cfg.depth}-block model")
        idx = sorted({b % self.cfg.depth for b in blocks})
        h, c = self._embed(x, t, self_cond, y)
        _, out = self._run_blocks(h, c, taps=set(idx), stop=idx[-1])
        return {b: out[b % self.cfg.depth] for b in blocks}


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
