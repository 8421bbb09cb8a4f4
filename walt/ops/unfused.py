"""The `torch` backend: what a user would write without walt's kernels.

`window_attention_sdpa` pads to whole windows, partitions, runs `scaled_dot_product_attention`
and reverses; `per_sample_randn` draws each example's noise with its own `torch.Generator`.
They are the models' pure-PyTorch path (`model.attention_backend: torch`,
`diffusion.noise_backend: torch`) and the benchmarks' baselines. The float64 oracles that
define the ops are in `walt.ops.reference`.
"""
import torch
import torch.nn.functional as F

from walt.ops.reference import _bias_for_window, clamp_window
from walt.seeding import mix_seed


def window_attention_sdpa(q, k, v, window, scale=None, rel_pos_bias=None):
    """The unfused path: pad to whole windows, partition, SDPA, reverse, crop.

    Same semantics as `window_attention_reference`; padded keys are masked out. This is what a
    user would write without walt's kernel, so it is the benchmark baseline.
    """
    B, T, H, W, heads, d = q.shape
    wt, wh, ww = clamp_window(window, (T, H, W))
    pt, ph, pw = (-T) % wt, (-H) % wh, (-W) % ww
    nt, nh, nw = (T + pt) // wt, (H + ph) // wh, (W + pw) // ww
    n = wt * wh * ww

    def partition(x):
        if pt or ph or pw:
            x = F.pad(x, (0, 0, 0, 0, 0, pw, 0, ph, 0, pt))
        x = x.reshape(B, nt, wt, nh, wh, nw, ww, heads, d)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6, 8)  # B, nt, nh, nw, heads, wt, wh, ww, d
        return x.reshape(B * nt * nh * nw, heads, n, d)

    mask = None
    if rel_pos_bias is not None:
        mask = _bias_for_window(rel_pos_bias, window, (wt, wh, ww)).to(q.dtype)[None]  # 1, heads, n, n
    if pt or ph or pw:
        valid = torch.ones(T + pt, H + ph, W + pw, dtype=torch.bool, device=q.device)
        valid[T:], valid[:, H:], valid[:, :, W:] = False, False, False
        valid = valid.reshape(nt, wt, nh, wh, nw, ww).permute(0, 2, 4, 1, 3, 5).reshape(1, nt * nh * nw, 1, 1, n)
        neg = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(~valid, float("-inf"))
        neg = neg.expand(B, -1, -1, -1, -1).reshape(B * nt * nh * nw, 1, 1, n)
        mask = neg if mask is None else mask + neg
    o = F.scaled_dot_product_attention(partition(q), partition(k), partition(v), attn_mask=mask, scale=scale)
    o = o.reshape(B, nt, nh, nw, heads, wt, wh, ww, d).permute(0, 1, 5, 2, 6, 3, 7, 4, 8)
    o = o.reshape(B, nt * wt, nh * wh, nw * ww, heads, d)
    return o[:, :T, :H, :W].contiguous()


def per_sample_randn(shape, seed, keys, stream=2, dtype=torch.float32, device="cpu"):
    """(B, *shape) standard normals; row b depends only on (seed, keys[b])."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(mix_seed(seed, int(k), stream))) for k in keys]
    return torch.stack(rows).to(device=device, dtype=dtype)
