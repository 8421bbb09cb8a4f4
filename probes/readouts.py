"""Readout heads on frozen features: one cross-attention block, V-JEPA / 4DS attentive-probe style.

Every readout takes features ``feats`` (B, T', h, w, C) (float16 or float32; cast to float32) and
``frame_index`` (T',) int64: the input frame each latent frame stands for, the last of the input
frames it covers (V-WALT: 5 latent frames for 17 input frames, [0, 4, 8, 12, 16]; I-WALT: 17, one
per input frame). Then:

    tokens  = Linear(LayerNorm(feats)) + spatial_pos[y, x] + temporal[frame_index[t']]   (B, L, D)
    queries = learned, or computed from the task's input (a point, a box) + temporal[t]
    x       = queries + Out(MultiHeadCrossAttention(q = Wq queries, k = Wk tokens, v = Wv tokens))
    x       = x + MLP(LayerNorm(x))                                   (mlp_ratio * D hidden, GELU)
    output  = Linear(x)

with L = T' * h * w tokens and D the readout width (64 by default, 4 heads). The spatial position
embedding is learned at ``grid`` = (h, w) and bilinearly interpolated to other grids; the temporal
embedding is learned over input frames (``max_frames`` rows) and shared by tokens and queries, so a
query for frame t and the tokens standing for frame t carry the same embedding.

**Which tokens a query sees.** Clip-level readouts (classification, camera pose) attend over all
L tokens. Per-frame readouts (depth, point tracking, box tracking) are *frame-local*: the queries
for input frame f attend only to the h * w tokens of the latent frame covering f, the first j with
``frame_index[j] >= f`` (``covering_frames``). For V-WALT, latent frame 0 covers input frame 0 and
latent frame j >= 1 covers frames frame_index[j-1] + 1 .. frame_index[j]; for I-WALT frame f is
latent frame f. So both models predict frame f from the features that stand for frame f, and the
cost of a per-frame readout grows with the number of frames, not with its square. A per-frame
readout has frames x queries-per-frame queries per clip, and their MLP is most of its work, so its
MLP is D wide (``mlp_ratio`` = 1; 4 for the clip-level readouts).

**Groups.** A readout object holds G independent readouts of the same architecture (``seeds``:
one per member; readout i is initialised from ``torch.Generator().manual_seed(seeds[i])`` alone,
so it is the same whatever group it sits in). Every parameter has a leading G axis and the
members are computed together in batched matrix products; the features are normalised once for
all of them. With ``seeds=None`` the object is one readout (initialised from a seed drawn from
torch's global generator) and outputs have no G axis; with a list of seeds outputs are (G, ...).

**Folded attention.** For few queries per token (classification, pose, boxes) the key and value
projections are folded into the queries, so the per-token work is O(C * heads * queries) instead
of O(C * D): logits = xhat (A Wk_h^T q_h) + E Wk_h^T q_h + bk_h . q_h and the attended value is
((a xhat) A + a E) Wv_h^T + bv_h, where xhat is the normalised features, A = diag(gamma) Win^T
folds the LayerNorm scale into the input linear and E (L, D) is all that does not depend on the
clip (LayerNorm shift, biases, embeddings). With many queries (depth, points) the keys and values
are computed once per token, with the input linear folded into them (k = xhat (A Wk^T) + E Wk^T +
bk), and the attention runs in ``scaled_dot_product_attention`` one frame at a time. Both are exact
(tests compare them with the textbook computation); which runs depends on shapes only
(``path`` = "auto", or "folded" / "plain" to force one).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "normalize_features", "fourier_features", "covering_frames", "sample_features", "pool_box",
    "AttentiveReadout", "PoseReadout", "DenseReadout", "PointTrackReadout", "BoxTrackReadout",
    "POSE_IDENTITY",
]

POSE_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)


def normalize_features(feats: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over channels without the affine part: (B, T', h, w, C) -> (B, T'*h*w, C) float32.

    The readouts apply their LayerNorm's scale and shift afterwards (folded into their first
    linear), so this parameter-free part is computed once for a whole group of readouts.
    """
    if feats.dim() != 5:
        raise ValueError(f"features must be (B, T', h, w, C), got shape {tuple(feats.shape)}")
    x = feats.float().flatten(1, 3)
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def fourier_features(p: torch.Tensor, num_bands: int) -> torch.Tensor:
    """(..., k) coordinates in [0, 1] -> (..., k * (1 + 2 * num_bands)): p, sin(2^i pi p), cos(2^i pi p)."""
    freqs = math.pi * 2.0 ** torch.arange(num_bands, dtype=p.dtype, device=p.device)
    a = p[..., None] * freqs
    return torch.cat([p, a.sin().flatten(-2), a.cos().flatten(-2)], dim=-1)


def covering_frames(frame_index: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(num_frames,) int64: for input frame f, the latent frame covering it, the first j with
    ``frame_index[j] >= f`` (``frame_index``: the last input frame each latent frame stands for,
    strictly increasing). [0, 4, 8, 12, 16] -> 0, 1, 1, 1, 1, 2, ..., 4; arange(T) -> arange(T)."""
    fi = torch.as_tensor(frame_index, dtype=torch.long).cpu()
    if fi.dim() != 1 or fi.numel() == 0:
        raise ValueError(f"frame_index must be a non-empty (T',) vector, got shape {tuple(fi.shape)}")
    if fi.numel() > 1 and not bool((fi[1:] > fi[:-1]).all()):
        raise ValueError(f"frame_index must be strictly increasing, got {fi.tolist()}")
    if int(fi[-1]) < num_frames - 1:
        raise ValueError(f"frame_index {fi.tolist()} does not cover input frames up to {num_frames - 1}: "
                         f"no latent frame stands for them")
    return torch.searchsorted(fi, torch.arange(num_frames, dtype=torch.long))


def sample_features(xhat: torch.Tensor, hw, frame: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bilinear sample of tokens: xhat (B, T'*h*w, C) ordered (t', y, x); frame (B, N) latent
    frame; y, x (B, N) positions as fractions of the frame's height and width (token centres at
    (i + 0.5) / h, as ``align_corners=False``; clamped at the border) -> (B, N, C)."""
    h, w = hw
    B, N = frame.shape
    gy = (y.float() * h - 0.5).clamp(0, h - 1)
    gx = (x.float() * w - 0.5).clamp(0, w - 1)
    y0, x0 = gy.floor(), gx.floor()
    wy, wx = gy - y0, gx - x0
    y0, x0 = y0.long(), x0.long()
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    base = frame.long() * (h * w)
    idx = torch.stack([base + y0 * w + x0, base + y0 * w + x1, base + y1 * w + x0, base + y1 * w + x1], -1)
    wgt = torch.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], -1)      # (B, N, 4)
    C = xhat.shape[-1]
    g = torch.gather(xhat, 1, idx.view(B, N * 4, 1).expand(B, N * 4, C)).view(B, N, 4, C)
    return (g * wgt[..., None]).sum(2)


def pool_box(xhat: torch.Tensor, hw, frame: int, box: torch.Tensor) -> torch.Tensor:
    """Mean of the tokens of latent frame ``frame`` inside a box, each token cell weighted by the
    area it shares with the box: xhat (B, T'*h*w, C), box (B, 4) (x0, y0, x1, y1) as fractions of
    the frame -> (B, C). A box covering no area reads the bilinear sample at its centre."""
    h, w = hw
    B = xhat.shape[0]
    box = box.float()
    x0, x1 = torch.minimum(box[:, 0], box[:, 2]), torch.maximum(box[:, 0], box[:, 2])
    y0, y1 = torch.minimum(box[:, 1], box[:, 3]), torch.maximum(box[:, 1], box[:, 3])

    def overlap(lo, hi, n):
        edges = torch.arange(n + 1, dtype=lo.dtype, device=lo.device) / n
        return (torch.minimum(hi[:, None], edges[1:]) - torch.maximum(lo[:, None], edges[:-1])).clamp(min=0)

    wgt = overlap(y0, y1, h)[:, :, None] * overlap(x0, x1, w)[:, None, :]                # (B, h, w)
    total = wgt.flatten(1).sum(1)
    tokens = xhat[:, frame * h * w:(frame + 1) * h * w]                                    # (B, h*w, C)
    pooled = torch.bmm(wgt.view(B, 1, h * w), tokens)[:, 0] / total.clamp(min=1e-12)[:, None]
    centre = sample_features(xhat, hw, torch.full((B, 1), frame, dtype=torch.long, device=xhat.device),
                             (0.5 * (y0 + y1))[:, None], (0.5 * (x0 + x1))[:, None])[:, 0]
    return torch.where((total > 0)[:, None], pooled, centre)


# ----------------------------------------------------------------------------- grouped algebra

def _glinear(x, w, b=None):
    """Per-member linear: x (G, ..., i), w (G, o, i), b (G, o) -> (G, ..., o)."""
    G, i = x.shape[0], x.shape[-1]
    x3 = x.reshape(G, -1, i)
    y = torch.bmm(x3, w.transpose(1, 2)) if b is None else torch.baddbmm(b[:, None, :], x3, w.transpose(1, 2))
    return y.view(*x.shape[:-1], w.shape[1])


def _shared_linear(x, w, b=None):
    """The same input for every member: x (..., i), w (G, o, i) -> (G, ..., o) in one GEMM."""
    G, o, i = w.shape
    y = x.reshape(-1, i) @ w.permute(2, 0, 1).reshape(i, G * o)
    y = y.view(-1, G, o).transpose(0, 1)
    if b is not None:
        y = y + b[:, None, :]
    return y.reshape(G, *x.shape[:-1], o)


def _glayer_norm(x, w, b, eps=1e-5):
    """x (G, ..., D); w, b (G, D)."""
    y = F.layer_norm(x, (x.shape[-1],), eps=eps)
    shape = (w.shape[0],) + (1,) * (x.dim() - 2) + (w.shape[1],)
    return y * w.view(shape) + b.view(shape)


class _Readout(nn.Module):
    """A group of readouts: parameters with a leading member axis, and the shared token side."""

    def __init__(self, in_dim, width, heads, grid, max_frames, seeds, mlp_ratio=4):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.single = seeds is None
        if seeds is None:
            seeds = [int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))]
        self.seeds = [int(s) for s in seeds]
        self.group = len(self.seeds)
        if self.group < 1:
            raise ValueError("seeds must name at least one readout")
        self.in_dim, self.width, self.heads = in_dim, width, heads
        self.grid, self.max_frames = tuple(grid), max_frames
        self.mlp_ratio = mlp_ratio
        self.path = "auto"
        self._inits, self.no_decay = {}, set()
        D, M = width, mlp_ratio * width
        self._param("norm_w", (in_dim,), "ones")
        self._param("norm_b", (in_dim,), "zeros")
        self._param("proj_w", (D, in_dim), "linear")
        self._param("proj_b", (D,), "zeros")
        self._param("pos_embed", (*self.grid, D), "embed")
        self._param("time_embed", (max_frames, D), "embed")
        for n in ("q", "k", "v", "out"):
            self._param(f"{n}_w", (D, D), "linear")
            self._param(f"{n}_b", (D,), "zeros")
        self._param("ln_w", (D,), "ones")
        self._param("ln_b", (D,), "zeros")
        self._param("mlp1_w", (M, D), "linear")
        self._param("mlp1_b", (M,), "zeros")
        self._param("mlp2_w", (D, M), "linear")
        self._param("mlp2_b", (D,), "zeros")

    def _param(self, name, shape, init):
        """init: 'linear' (trunc. normal, std 0.02: decayed), 'embed' (the same, not decayed),
        'zeros', 'ones', or a float constant."""
        self.register_parameter(name, nn.Parameter(torch.empty(self.group, *shape)))
        self._inits[name] = init
        if init != "linear":
            self.no_decay.add(name)

    @torch.no_grad()
    def _initialize(self):
        """Member i from its own generator, parameters in registration order."""
        for i, seed in enumerate(self.seeds):
            g = torch.Generator().manual_seed(seed)
            for name, init in self._inits.items():
                p = getattr(self, name)[i]
                if init in ("linear", "embed"):
                    nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04, generator=g)
                elif init == "zeros":
                    p.zero_()
                elif init == "ones":
                    p.fill_(1.0)
                else:
                    p.fill_(float(init))

    def decay_mask(self):
        """{name: whether AdamW's weight decay applies} (weight matrices only)."""
        return {n: n not in self.no_decay for n, _ in self.named_parameters()}

    # -- inputs

    def _check(self, feats, frame_index, normalized, hw):
        if normalized:
            if feats.dim() != 3 or feats.shape[-1] != self.in_dim or hw is None:
                raise ValueError(f"normalized features must be (B, L, {self.in_dim}) with hw=(h, w), "
                                 f"got {tuple(feats.shape)} and hw={hw}")
            hw = tuple(hw)
            if feats.shape[1] != frame_index.shape[0] * hw[0] * hw[1]:
                raise ValueError(f"{feats.shape[1]} tokens do not match frame_index {tuple(frame_index.shape)} x hw {hw}")
        else:
            if feats.dim() != 5 or feats.shape[-1] != self.in_dim:
                raise ValueError(f"features must be (B, T', h, w, {self.in_dim}), got {tuple(feats.shape)}")
            if frame_index.shape != (feats.shape[1],):
                raise ValueError(f"frame_index must be ({feats.shape[1]},): the input frame of each latent "
                                 f"frame, got {tuple(frame_index.shape)}")
            hw = tuple(feats.shape[2:4])
        if frame_index.numel() and (int(frame_index.max()) >= self.max_frames or int(frame_index.min()) < 0):
            raise ValueError(f"frame_index {frame_index.tolist()} is outside the readout's "
                             f"{self.max_frames} input frames (max_frames)")
        return hw

    def _out(self, y):
        return y[0] if self.single else y

    # -- the block

    def _token_side(self, frame_index, hw):
        """A (G, C, D) and E (G, L, D), tokens ordered (t', y, x)."""
        A = self.norm_w[:, :, None] * self.proj_w.transpose(1, 2)
        pos = self.pos_embed
        if tuple(hw) != self.grid:
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=tuple(hw), mode="bilinear",
                                align_corners=False).permute(0, 2, 3, 1)
        const = torch.einsum("gc,gdc->gd", self.norm_b, self.proj_w) + self.proj_b
        e = const[:, None, None, None, :] + pos[:, None] + self.time_embed[:, frame_index][:, :, None, None, :]
        return A, e.reshape(self.group, -1, self.width)

    def _folded(self, Q, C):
        """Whether folding is cheaper when Q queries attend to every token (per-token work)."""
        if self.path != "auto":
            return self.path == "folded"
        D, H = self.width, self.heads
        return H * Q * (2 * C + D) < C * D + 2 * D * D + 2 * Q * D

    def _mlp(self, queries, o):
        """queries (G, 1 or B, ..., D) + Out(o (G, B, ..., D)), then the residual MLP."""
        x = queries + _glinear(o, self.out_w, self.out_b)
        y = _glinear(F.gelu(_glinear(_glayer_norm(x, self.ln_w, self.ln_b), self.mlp1_w, self.mlp1_b)),
                     self.mlp2_w, self.mlp2_b)
        return x + y

    def _attend(self, queries, feats, frame_index, hw, normalized):
        """Global attention: queries (G, B or 1, Q, D) over all tokens -> the block's output (G, B, Q, D)."""
        xhat = feats if normalized else normalize_features(feats)
        A, E = self._token_side(frame_index, hw)
        G, _, Q, D = queries.shape
        B, L, C = xhat.shape
        if not self._folded(Q, C):
            queries = queries.expand(G, B, Q, D)
        H, d = self.heads, D // self.heads
        scale = 1.0 / math.sqrt(d)
        q = _glinear(queries, self.q_w, self.q_b).view(G, queries.shape[1], Q, H, d)
        if self._folded(Q, C):
            # Queries may be shared by every clip (Bq = 1: learned queries) or per clip (Bq = B).
            Bq, K = q.shape[1], G * Q * H
            u = torch.einsum("gbqhi,ghid->gbqhd", q, self.k_w.view(G, H, d, D)) * scale
            u3 = u.reshape(G, Bq * Q * H, D)
            ux = torch.bmm(u3, A.transpose(1, 2)).view(G, Bq, Q * H, C)
            ux = ux.transpose(0, 1).reshape(Bq, K, C)
            kb = torch.einsum("gbqhi,ghi->gbqh", q, self.k_b.view(G, H, d)) * scale
            eu = torch.baddbmm(kb.reshape(G, -1, 1), u3, E.transpose(1, 2)).view(G, Bq, Q * H, L)
            eu = eu.transpose(0, 1).reshape(Bq, K, L)
            if Bq == 1:
                logits = torch.baddbmm(eu[0], ux.expand(B, K, C), xhat.transpose(1, 2))
            else:
                logits = torch.baddbmm(eu, ux, xhat.transpose(1, 2))                    # (B, K, L)
            a = logits.softmax(-1)
            # Values: (a xhat)(A Wv_h^T) + a (E Wv_h^T) + bv_h, never forming v for every token.
            wv = self.v_w.view(G, H, d, D)
            av = torch.einsum("gcd,ghid->ghci", A, wv)
            ev = torch.einsum("gld,ghid->ghli", E, wv).reshape(G * H, L, d)
            px = torch.bmm(a, xhat).view(B, G, Q, H, C)
            o = torch.einsum("bgqhc,ghci->gbqhi", px, av)
            a2 = a.view(B, G, Q, H, L).permute(1, 3, 0, 2, 4).reshape(G * H, B * Q, L)
            o = o + torch.bmm(a2, ev).view(G, H, B, Q, d).permute(0, 2, 3, 1, 4)
            o = (o + self.v_b.view(G, 1, 1, H, d)).reshape(G, B, Q, D)
        else:
            h = _shared_linear(xhat, A.transpose(1, 2)) + E[:, None]                  # (G, B, L, D)
            k = _glinear(h, self.k_w, self.k_b).view(G * B, L, H, d).transpose(1, 2)
            v = _glinear(h, self.v_w, self.v_b).view(G * B, L, H, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q.view(G * B, Q, H, d).transpose(1, 2), k, v)
            o = o.transpose(1, 2).reshape(G, B, Q, D)
        return self._mlp(queries, o)

    def _attend_local(self, queries, xhat, frame_index, hw, cover, q=None):
        """Frame-local attention: queries (G, 1 or B, T, Qf, D), those of input frame f over the
        h * w tokens of latent frame cover[f] only -> the block's output (G, B, T, Qf, D).

        ``q`` (the same shape): Wq queries + bq when the caller has it cheaper (by linearity)."""
        A, E = self._token_side(frame_index, hw)
        G, Bq, T, Qf, D = queries.shape
        B, L, C = xhat.shape
        n = hw[0] * hw[1]
        Tl = L // n
        H, d = self.heads, D // self.heads
        scale = 1.0 / math.sqrt(d)
        cover = cover.to(xhat.device)
        identity = T == Tl and bool((cover == torch.arange(T, device=cover.device)).all())
        if q is None:
            q = _glinear(queries, self.q_w, self.q_b)
        per_latent = int(torch.bincount(cover, minlength=Tl).max())
        if self._folded(Qf * per_latent, C):
            # Folded, per input frame: logits over its n tokens (B, T, G*Qf*H, n).
            xf, Ef = xhat.view(B, Tl, n, C), E.view(G, Tl, n, D)
            if not identity:
                xf, Ef = xf.index_select(1, cover), Ef.index_select(1, cover)          # (B, T, n, C)
            K = G * Qf * H
            qh = q.view(G, Bq, T, Qf, H, d)
            u = torch.einsum("gbtqhi,ghid->gbtqhd", qh, self.k_w.view(G, H, d, D)) * scale
            kb = torch.einsum("gbtqhi,ghi->gbtqh", qh, self.k_b.view(G, H, d)) * scale
            ux = torch.einsum("gbtqhd,gcd->btgqhc", u, A).reshape(Bq, T, K, C)
            eu = torch.einsum("gbtqhd,gtnd->btgqhn", u, Ef) + kb.permute(1, 2, 0, 3, 4)[..., None]
            logits = torch.matmul(ux, xf.transpose(2, 3)) + eu.reshape(Bq, T, K, n)    # (B, T, K, n)
            a = logits.softmax(-1)
            wv = self.v_w.view(G, H, d, D)
            av = torch.einsum("gcd,ghid->ghci", A, wv)
            ev = torch.einsum("gtnd,ghid->gthni", Ef, wv)
            px = torch.matmul(a, xf).view(B, T, G, Qf, H, C)
            o = torch.einsum("btgqhc,ghci->gbtqhi", px, av)
            o = o + torch.einsum("btgqhn,gthni->gbtqhi", a.view(B, T, G, Qf, H, n), ev)
            o = (o + self.v_b.view(G, 1, 1, 1, H, d)).reshape(G, B, T, Qf, D)
        else:
            # Keys and values once per token, the input linear folded in: xhat (A W^T) + (E W^T + b).
            wkv = torch.cat([self.k_w, self.v_w], 1).transpose(1, 2)                  # (G, D, 2D)
            akv = torch.bmm(A, wkv)                                                      # (G, C, 2D)
            ekv = torch.baddbmm(torch.cat([self.k_b, self.v_b], 1)[:, None], E, wkv)    # (G, L, 2D)
            kv = torch.bmm(xhat.reshape(1, B * L, C).expand(G, B * L, C), akv).view(G, B, Tl, n, 2 * D)
            kv = kv + ekv.view(G, 1, Tl, n, 2 * D)
            if not identity:
                kv = kv.index_select(2, cover)                                           # (G, B, T, n, 2D)
            k, v = kv.view(G * B * T, n, 2, H, d).unbind(2)       # unbind: its backward stacks, no zero fill
            q = q.expand(G, B, T, Qf, D).reshape(G * B * T, Qf, H, d)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            o = o.transpose(1, 2).reshape(G, B, T, Qf, D)
        return self._mlp(queries, o)


class AttentiveReadout(_Readout):
    """Classification: ``num_queries`` learned queries -> cross-attention over all tokens -> mean
    over queries -> linear -> logits.

    forward(feats (B, T', h, w, C), frame_index (T',)) -> logits (B, num_classes), or
    (G, B, num_classes) for a group (``seeds`` given).
    """

    def __init__(self, in_dim: int, num_classes: int, *, width: int = 64, heads: int = 4,
                 num_queries: int = 1, grid=(8, 8), max_frames: int = 17, mlp_ratio: int = 4, seeds=None):
        super().__init__(in_dim, width, heads, grid, max_frames, seeds, mlp_ratio)
        self.num_classes = num_classes
        self._param("query", (num_queries, width), "embed")
        self._param("head_w", (num_classes, width), "linear")
        self._param("head_b", (num_classes,), "zeros")
        self._initialize()

    def forward(self, feats, frame_index, *, normalized=False, hw=None):
        hw = self._check(feats, frame_index, normalized, hw)
        x = self._attend(self.query[:, None], feats, frame_index, hw, normalized).mean(2)
        return self._out(_glinear(x, self.head_w, self.head_b))


class PoseReadout(AttentiveReadout):
    """Camera pose: one learned query over all tokens -> the 12-D pose of the last input frame's
    camera relative to the first (R row-major, then t; ``probes.metrics.pose12_from_cam_to_world``).

    The head predicts the offset from the identity pose (an untrained readout says "no motion").
    forward(feats, frame_index) -> (B, 12) (or (G, B, 12)).
    """

    def __init__(self, in_dim: int, *, width: int = 64, heads: int = 4, grid=(8, 8), max_frames: int = 17,
                 mlp_ratio: int = 4, seeds=None):
        super().__init__(in_dim, 12, width=width, heads=heads, grid=grid, max_frames=max_frames,
                         mlp_ratio=mlp_ratio, seeds=seeds)

    def forward(self, feats, frame_index, *, normalized=False, hw=None):
        out = super().forward(feats, frame_index, normalized=normalized, hw=hw)
        return out + out.new_tensor(POSE_IDENTITY)


class _Local(_Readout):
    """A per-frame readout: queries of input frame f see only the latent frame covering f."""

    def _inputs(self, feats, frame_index, normalized, hw):
        hw = self._check(feats, frame_index, normalized, hw)
        xhat = feats if normalized else normalize_features(feats)
        return xhat, hw, covering_frames(frame_index, self.num_frames)


class DenseReadout(_Local):
    """Depth: one query per output patch per input frame -> a (ph, pw) patch of log-depth.

    Queries are a learned embedding per patch position plus the temporal embedding of the frame
    (the same for every clip); the queries of frame f attend only to the tokens of the latent
    frame covering f (module docstring). The output is natural-log depth in metres
    (depth = exp(output)): every output is a positive depth and errors are relative, as AbsRel
    measures them; ``init_value`` starts the head's bias (e.g. the mean log-depth of the training
    set).

    forward(feats (B, T', h, w, C), frame_index (T',)) -> log-depth (B, num_frames, H, W) (or with
    a leading G), H, W = out_size (the input resolution), for input frames 0 .. num_frames - 1.
    """

    def __init__(self, in_dim: int, out_size, num_frames: int, *, patch=8, width: int = 64, heads: int = 4,
                 grid=(8, 8), max_frames: int | None = None, init_value: float = 0.0, mlp_ratio: int = 1,
                 seeds=None):
        max_frames = num_frames if max_frames is None else max_frames
        super().__init__(in_dim, width, heads, grid, max_frames, seeds, mlp_ratio)
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        H, W = out_size
        if H % ph or W % pw:
            raise ValueError(f"out_size {tuple(out_size)} must be a multiple of the patch ({ph}, {pw})")
        if num_frames > max_frames:
            raise ValueError(f"num_frames ({num_frames}) exceeds max_frames ({max_frames})")
        self.out_size, self.num_frames, self.patch = (H, W), num_frames, (ph, pw)
        self._param("patch_embed", (H // ph, W // pw, width), "embed")
        self._param("head_w", (ph * pw, width), "linear")
        self._param("head_b", (ph * pw,), float(init_value))
        self._initialize()

    def forward(self, feats, frame_index, *, normalized=False, hw=None):
        xhat, hw, cover = self._inputs(feats, frame_index, normalized, hw)
        G, B, T = self.group, xhat.shape[0], self.num_frames
        (H, W), (ph, pw) = self.out_size, self.patch
        nh, nw = H // ph, W // pw
        q = self.patch_embed[:, None] + self.time_embed[:, :T, None, None, :]        # (G, T, nh, nw, D)
        q = q.reshape(G, 1, T, nh * nw, self.width)
        y = _glinear(self._attend_local(q, xhat, frame_index, hw, cover), self.head_w, self.head_b)
        y = y.view(G, B, T, nh, nw, ph, pw).permute(0, 1, 2, 3, 5, 4, 6)
        return self._out(y.reshape(G, B, T, H, W))


class _Encoded(_Local):
    """A readout whose queries come from coordinates (Fourier features -> MLP (D, GELU, D)) plus
    what the features say at those coordinates (a linear projection ``samp`` of normalised
    features)."""

    def __init__(self, k, in_dim, num_frames, image_size, width, heads, grid, max_frames, num_bands, mlp_ratio,
                 seeds):
        """k coordinates in, k outputs per frame (the head)."""
        max_frames = num_frames if max_frames is None else max_frames
        super().__init__(in_dim, width, heads, grid, max_frames, seeds, mlp_ratio)
        self.num_frames, self.image_size = num_frames, tuple(image_size)
        self._encoder(k, num_bands)
        self._param("head_w", (k, width), "linear")
        self._param("head_b", (k,), "zeros")
        self._initialize()

    def _encoder(self, k, num_bands):
        self.num_bands = num_bands
        D = self.width
        self._param("enc1_w", (D, k * (1 + 2 * num_bands)), "linear")
        self._param("enc1_b", (D,), "zeros")
        self._param("enc2_w", (D, D), "linear")
        self._param("enc2_b", (D,), "zeros")
        self._param("samp_w", (D, self.in_dim), "linear")
        self._param("samp_b", (D,), "zeros")

    def _encode(self, p, sampled):
        """p (B, ..., k) in [0, 1] and sampled features (B, ..., C), the same for every member ->
        (G, B, ..., D)."""
        h = F.gelu(_shared_linear(fourier_features(p, self.num_bands), self.enc1_w, self.enc1_b))
        return _glinear(h, self.enc2_w, self.enc2_b) + _shared_linear(sampled, self.samp_w, self.samp_b)

    def _per_frame(self, tok, xhat, frame_index, hw, cover):
        """tok (G, B, N, D) -> for every input frame f: tok + temporal[f] attends to latent frame
        cover[f] -> (G, B, T, N, D). The query projection is split by linearity:
        Wq (tok + temporal[f]) + bq = Wq tok + (Wq temporal[f] + bq)."""
        T = self.num_frames
        time = self.time_embed[:, :T]                                                   # (G, T, D)
        x0 = tok[:, :, None] + time[:, None, :, None]                                   # (G, B, T, N, D)
        q = _glinear(tok, self.q_w)[:, :, None] + _glinear(time, self.q_w, self.q_b)[:, None, :, None]
        return self._attend_local(x0, xhat, frame_index, hw, cover, q=q)


class PointTrackReadout(_Encoded):
    """Point tracking: a query point (t, y, x) in pixels, normalised to [0, 1] (t by the last
    frame, y by H, x by W) -> a token = MLP(Fourier features) + a projection of the normalised
    feature bilinearly sampled at (y, x) in the latent frame covering frame t (the point's
    appearance); for every input frame f the token + temporal embedding of f is a query over the
    tokens of the latent frame covering f only -> (dx, dy, visibility logit).

    Positions are offsets from the query point in units of the frame size; t is rounded to a frame
    and clamped to the clip. forward(feats, frame_index, query (B, N, 3)) -> (tracks (B, N, T, 2)
    as (x, y) pixels, vis_logits (B, N, T)), T = num_frames, pixels at image_size = (H, W); a
    leading G for groups.
    """

    def __init__(self, in_dim: int, num_frames: int, image_size, *, width: int = 64, heads: int = 4,
                 grid=(8, 8), max_frames: int | None = None, num_bands: int = 8, mlp_ratio: int = 1,
                 seeds=None):
        super().__init__(3, in_dim, num_frames, image_size, width, heads, grid, max_frames, num_bands, mlp_ratio,
                         seeds)

    def forward(self, feats, frame_index, query, *, normalized=False, hw=None):
        xhat, hw, cover = self._inputs(feats, frame_index, normalized, hw)
        if query.dim() != 3 or query.shape[-1] != 3 or query.shape[0] != xhat.shape[0]:
            raise ValueError(f"query must be (B, N, 3) as (t, y, x) pixels, got {tuple(query.shape)}")
        T = self.num_frames
        H, W = self.image_size
        query = query.float()
        p = query * query.new_tensor([1.0 / max(T - 1, 1), 1.0 / H, 1.0 / W])
        t = query[..., 0].round().long().clamp(0, T - 1)
        sampled = sample_features(xhat, hw, cover.to(t.device)[t], p[..., 1], p[..., 2])
        x = self._per_frame(self._encode(p, sampled), xhat, frame_index, hw, cover)       # (G, B, T, N, D)
        y = _glinear(x, self.head_w, self.head_b).transpose(2, 3)                        # (G, B, N, T, 3)
        start = torch.stack([p[..., 2], p[..., 1]], -1)[:, :, None, :]
        tracks = (start + y[..., :2]) * query.new_tensor([float(W), float(H)])
        return self._out(tracks), self._out(y[..., 2])


class BoxTrackReadout(_Encoded):
    """Box tracking: the first frame's box (x0, y0, x1, y1) in pixels -> normalised -> a token =
    MLP(Fourier features) + a projection of the normalised features pooled inside the box in the
    latent frame covering frame 0 (``pool_box``: the object's appearance); per input frame f the
    token + temporal embedding of f is a query over the tokens of the latent frame covering f only
    -> the box, as an offset from the first one.

    forward(feats, frame_index, box (B, 4)) -> boxes (B, T, 4) in pixels at image_size = (H, W)
    (a leading G for groups).
    """

    def __init__(self, in_dim: int, num_frames: int, image_size, *, width: int = 64, heads: int = 4,
                 grid=(8, 8), max_frames: int | None = None, num_bands: int = 8, mlp_ratio: int = 1,
                 seeds=None):
        super().__init__(4, in_dim, num_frames, image_size, width, heads, grid, max_frames, num_bands, mlp_ratio,
                         seeds)

    def forward(self, feats, frame_index, box, *, normalized=False, hw=None):
        xhat, hw, cover = self._inputs(feats, frame_index, normalized, hw)
        if box.dim() != 2 or box.shape[-1] != 4 or box.shape[0] != xhat.shape[0]:
            raise ValueError(f"box must be (B, 4) as (x0, y0, x1, y1) pixels, got {tuple(box.shape)}")
        H, W = self.image_size
        size = box.new_tensor([float(W), float(H), float(W), float(H)])
        p = box.float() / size
        tok = self._encode(p[:, None], pool_box(xhat, hw, int(cover[0]), p)[:, None])   # (G, B, 1, D)
        x = self._per_frame(tok, xhat, frame_index, hw, cover)[:, :, :, 0]              # (G, B, T, D)
        y = _glinear(x, self.head_w, self.head_b)
        return self._out((p[:, None, :] + y) * size)
