"""Readout heads on frozen features: one cross-attention block, V-JEPA / 4DS attentive-probe style.

Every readout takes features ``feats`` (B, T', h, w, C) (float16 or float32; cast to float32) and
``frame_index`` (T',) int64: the input frame each latent frame stands for (V-WALT: 5 latent
frames for 17 input frames, [0, 4, 8, 12, 16]; I-WALT: 17, one per input frame). Then:

    tokens  = Linear(LayerNorm(feats)) + spatial_pos[y, x] + temporal[frame_index[t']]   (B, L, D)
    queries = learned, or computed from the task's input (a point, a box) + temporal[t]
    x       = queries + Out(MultiHeadCrossAttention(q = Wq queries, k = Wk tokens, v = Wv tokens))
    x       = x + MLP(LayerNorm(x))                                              (4D hidden, GELU)
    output  = Linear(x)

with L = T' * h * w tokens and D the readout width (64 by default, 4 heads). The spatial position
embedding is learned at ``grid`` = (h, w) and bilinearly interpolated to other grids; the temporal
embedding is learned over input frames (``max_frames`` rows) and shared by tokens and queries, so a
query for frame t and the tokens standing for frame t carry the same embedding.

**Groups.** A readout object holds G independent readouts of the same architecture (``seeds``:
one per member; readout i is initialised from ``torch.Generator().manual_seed(seeds[i])`` alone,
so it is the same whatever group it sits in). Every parameter has a leading G axis and the
members are computed together in batched matrix products; the features are normalised once for
all of them. With ``seeds=None`` the object is one readout (initialised from a seed drawn from
torch's global generator) and outputs have no G axis; with a list of seeds outputs are (G, ...).

**Folded attention.** For a few queries (classification, pose, boxes) the key and value
projections are folded into the queries, so the per-token work is O(C * heads * queries) instead
of O(C * D): logits = xhat (A Wk_h^T q_h) + E Wk_h^T q_h + bk_h . q_h and the attended value is
((a xhat) A + a E) Wv_h^T + bv_h, where xhat is the normalised features, A = diag(gamma) Win^T
folds the LayerNorm scale into the input linear and E (L, D) is all that does not depend on the
clip (LayerNorm shift, biases, embeddings). This is exact (tests compare it with the textbook
computation); which path runs depends on shapes only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "normalize_features", "fourier_features", "AttentiveReadout", "PoseReadout", "DenseReadout",
    "PointTrackReadout", "BoxTrackReadout", "POSE_IDENTITY",
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

    def __init__(self, in_dim, width, heads, grid, max_frames, seeds):
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
        self._inits, self.no_decay = {}, set()
        D = width
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
        self._param("mlp1_w", (4 * D, D), "linear")
        self._param("mlp1_b", (4 * D,), "zeros")
        self._param("mlp2_w", (D, 4 * D), "linear")
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
        D, H = self.width, self.heads
        return H * Q * (2 * C + D) < C * D + 2 * D * D + 2 * Q * D

    def _attend(self, queries, feats, frame_index, hw, normalized):
        """queries (G, B or 1, Q, D) -> the block's output (G, B, Q, D)."""
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
        x = queries + _glinear(o, self.out_w, self.out_b)                           # (G, B, Q, D)
        y = _glinear(F.gelu(_glinear(_glayer_norm(x, self.ln_w, self.ln_b), self.mlp1_w, self.mlp1_b)),
                     self.mlp2_w, self.mlp2_b)
        return x + y


class AttentiveReadout(_Readout):
    """Classification: ``num_queries`` learned queries -> cross-attention -> mean over queries ->
    linear -> logits.

    forward(feats (B, T', h, w, C), frame_index (T',)) -> logits (B, num_classes), or
    (G, B, num_classes) for a group (``seeds`` given).
    """

    def __init__(self, in_dim: int, num_classes: int, *, width: int = 64, heads: int = 4,
                 num_queries: int = 1, grid=(8, 8), max_frames: int = 17, seeds=None):
        super().__init__(in_dim, width, heads, grid, max_frames, seeds)
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
    """Camera pose: one learned query -> the 12-D pose of the last input frame's camera relative
    to the first (R row-major, then t; ``probes.metrics.pose12_from_cam_to_world``).

    The head predicts the offset from the identity pose (an untrained readout says "no motion").
    forward(feats, frame_index) -> (B, 12) (or (G, B, 12)).
    """

    def __init__(self, in_dim: int, *, width: int = 64, heads: int = 4, grid=(8, 8), max_frames: int = 17,
                 seeds=None):
        super().__init__(in_dim, 12, width=width, heads=heads, grid=grid, max_frames=max_frames, seeds=seeds)

    def forward(self, feats, frame_index, *, normalized=False, hw=None):
        out = super().forward(feats, frame_index, normalized=normalized, hw=hw)
        return out + out.new_tensor(POSE_IDENTITY)


class DenseReadout(_Readout):
    """Depth: one query per output patch per input frame -> a (ph, pw) patch of log-depth.

    Queries are a learned embedding per patch position plus the temporal embedding of the frame
    (the same for every clip). The output is natural-log depth in metres (depth = exp(output)):
    every output is a positive depth and errors are relative, as AbsRel measures them;
    ``init_value`` starts the head's bias (e.g. the mean log-depth of the training set).

    forward(feats (B, T', h, w, C), frame_index (T',)) -> log-depth (B, num_frames, H, W) (or with
    a leading G), H, W = out_size (the input resolution), for input frames 0 .. num_frames - 1.
    """

    def __init__(self, in_dim: int, out_size, num_frames: int, *, patch=8, width: int = 64, heads: int = 4,
                 grid=(8, 8), max_frames: int | None = None, init_value: float = 0.0, seeds=None):
        max_frames = num_frames if max_frames is None else max_frames
        super().__init__(in_dim, width, heads, grid, max_frames, seeds)
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
        hw = self._check(feats, frame_index, normalized, hw)
        G, B, T = self.group, feats.shape[0], self.num_frames
        (H, W), (ph, pw) = self.out_size, self.patch
        nh, nw = H // ph, W // pw
        q = self.patch_embed[:, None] + self.time_embed[:, :T, None, None, :]        # (G, T, nh, nw, D)
        q = q.reshape(G, 1, -1, self.width).expand(-1, B, -1, -1)
        y = _glinear(self._attend(q, feats, frame_index, hw, normalized), self.head_w, self.head_b)
        y = y.view(G, B, T, nh, nw, ph, pw).permute(0, 1, 2, 3, 5, 4, 6)
        return self._out(y.reshape(G, B, T, H, W))


class _Encoded(_Readout):
    """A readout whose queries come from coordinates: Fourier features -> MLP (D, GELU, D)."""

    def _encoder(self, k, num_bands):
        self.num_bands = num_bands
        D = self.width
        self._param("enc1_w", (D, k * (1 + 2 * num_bands)), "linear")
        self._param("enc1_b", (D,), "zeros")
        self._param("enc2_w", (D, D), "linear")
        self._param("enc2_b", (D,), "zeros")

    def _encode(self, p):
        """p (B, ..., k) in [0, 1], the same for every member -> (G, B, ..., D)."""
        h = F.gelu(_shared_linear(fourier_features(p, self.num_bands), self.enc1_w, self.enc1_b))
        return _glinear(h, self.enc2_w, self.enc2_b)


class PointTrackReadout(_Encoded):
    """Point tracking: a query point (t, y, x) in pixels, normalised to [0, 1] (t by the last
    frame, y by H, x by W) -> Fourier features -> MLP -> a token; for every input frame t the
    token + temporal embedding of t is a query -> cross-attention -> (dx, dy, visibility logit).

    Positions are offsets from the query point in units of the frame size.
    forward(feats, frame_index, query (B, N, 3)) -> (tracks (B, N, T, 2) as (x, y) pixels,
    vis_logits (B, N, T)), T = num_frames, pixels at image_size = (H, W); a leading G for groups.
    """

    def __init__(self, in_dim: int, num_frames: int, image_size, *, width: int = 64, heads: int = 4,
                 grid=(8, 8), max_frames: int | None = None, num_bands: int = 8, seeds=None):
        max_frames = num_frames if max_frames is None else max_frames
        super().__init__(in_dim, width, heads, grid, max_frames, seeds)
        self.num_frames, self.image_size = num_frames, tuple(image_size)
        self._encoder(3, num_bands)
        self._param("head_w", (3, width), "linear")
        self._param("head_b", (3,), "zeros")
        self._initialize()

    def forward(self, feats, frame_index, query, *, normalized=False, hw=None):
        hw = self._check(feats, frame_index, normalized, hw)
        if query.dim() != 3 or query.shape[-1] != 3 or query.shape[0] != feats.shape[0]:
            raise ValueError(f"query must be (B, N, 3) as (t, y, x) pixels, got {tuple(query.shape)}")
        G, (B, N, _), T = self.group, query.shape, self.num_frames
        H, W = self.image_size
        p = query.float() * query.new_tensor([1.0 / max(T - 1, 1), 1.0 / H, 1.0 / W])
        tok = self._encode(p)                                                         # (G, B, N, D)
        q = (tok[:, :, :, None, :] + self.time_embed[:, None, None, :T]).reshape(G, B, N * T, self.width)
        y = _glinear(self._attend(q, feats, frame_index, hw, normalized), self.head_w, self.head_b)
        y = y.view(G, B, N, T, 3)
        start = torch.stack([p[..., 2], p[..., 1]], -1)[:, :, None, :]
        tracks = (start + y[..., :2]) * query.new_tensor([float(W), float(H)])
        return self._out(tracks), self._out(y[..., 2])


class BoxTrackReadout(_Encoded):
    """Box tracking: the first frame's box (x0, y0, x1, y1) in pixels -> normalised -> Fourier
    features -> MLP -> a token; per input frame the token + temporal embedding -> cross-attention
    -> the box, as an offset from the first one.

    forward(feats, frame_index, box (B, 4)) -> boxes (B, T, 4) in pixels at image_size = (H, W)
    (a leading G for groups).
    """

    def __init__(self, in_dim: int, num_frames: int, image_size, *, width: int = 64, heads: int = 4,
                 grid=(8, 8), max_frames: int | None = None, num_bands: int = 8, seeds=None):
        max_frames = num_frames if max_frames is None else max_frames
        super().__init__(in_dim, width, heads, grid, max_frames, seeds)
        self.num_frames, self.image_size = num_frames, tuple(image_size)
        self._encoder(4, num_bands)
        self._param("head_w", (4, width), "linear")
        self._param("head_b", (4,), "zeros")
        self._initialize()

    def forward(self, feats, frame_index, box, *, normalized=False, hw=None):
        hw = self._check(feats, frame_index, normalized, hw)
        if box.dim() != 2 or box.shape[-1] != 4 or box.shape[0] != feats.shape[0]:
            raise ValueError(f"box must be (B, 4) as (x0, y0, x1, y1) pixels, got {tuple(box.shape)}")
        G, B, T = self.group, box.shape[0], self.num_frames
        H, W = self.image_size
        size = box.new_tensor([float(W), float(H), float(W), float(H)])
        p = box.float() / size
        q = self._encode(p)[:, :, None, :] + self.time_embed[:, None, :T]              # (G, B, T, D)
        y = _glinear(self._attend(q, feats, frame_index, hw, normalized), self.head_w, self.head_b)
        return self._out((p[:, None, :] + y) * size)
