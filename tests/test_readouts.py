"""Readout heads: shapes, gradients, the folded and plain attention against the textbook one, groups,
frame-local attention of the per-frame readouts, and the point readout's sampled feature."""
import math

import pytest
import torch
import torch.nn.functional as F

from probes.readouts import (AttentiveReadout, BoxTrackReadout, DenseReadout, PointTrackReadout, PoseReadout,
                             covering_frames, fourier_features, normalize_features, pool_box, sample_features)

torch.set_num_threads(1)
B, TL, h, w, C = 3, 3, 4, 4, 8
FI = torch.tensor([0, 4, 8])                      # V-WALT style: latent frames for input frames 0, 4, 8
COVER = [0, 1, 1, 1, 1, 2, 2, 2, 2]               # the latent frame covering each of the 9 input frames


def _feats(seed=0, dtype=torch.float32):
    return torch.randn(B, TL, h, w, C, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _reference(r, g, feats, queries, frames=None):
    """Member g of readout r, written out plainly: LayerNorm, linear, embeddings, multi-head
    cross-attention with explicit k and v, residual MLP. ``frames`` (Q,): the latent frame each
    query may see (all tokens when None)."""
    P = {n: p[g] for n, p in r.named_parameters()}
    D, H = r.width, r.heads
    d = D // H
    x = F.layer_norm(feats.float(), (C,), P["norm_w"], P["norm_b"]) @ P["proj_w"].t() + P["proj_b"]
    pos = P["pos_embed"]
    if pos.shape[:2] != feats.shape[2:4]:
        pos = F.interpolate(pos.permute(2, 0, 1)[None], size=feats.shape[2:4], mode="bilinear",
                            align_corners=False)[0].permute(1, 2, 0)
    x = x + pos + P["time_embed"][FI][:, None, None]
    tok = x.flatten(1, 3)
    q = (queries @ P["q_w"].t() + P["q_b"]).view(B, -1, H, d).transpose(1, 2)
    k = (tok @ P["k_w"].t() + P["k_b"]).view(B, -1, H, d).transpose(1, 2)
    v = (tok @ P["v_w"].t() + P["v_b"]).view(B, -1, H, d).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    if frames is not None:
        token_frame = torch.arange(feats.shape[1]).repeat_interleave(feats.shape[2] * feats.shape[3])
        logits = logits.masked_fill(torch.as_tensor(frames)[:, None] != token_frame[None], float("-inf"))
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, D)
    y = queries + o @ P["out_w"].t() + P["out_b"]
    m = F.layer_norm(y, (D,), P["ln_w"], P["ln_b"])
    return y + F.gelu(m @ P["mlp1_w"].t() + P["mlp1_b"]) @ P["mlp2_w"].t() + P["mlp2_b"], P


def _encode_reference(r, P, p, sampled):
    h = F.gelu(fourier_features(p, r.num_bands) @ P["enc1_w"].t() + P["enc1_b"])
    return h @ P["enc2_w"].t() + P["enc2_b"] + sampled @ P["samp_w"].t() + P["samp_b"]


@pytest.mark.parametrize("grid", [(h, w), (2, 2)])
def test_attentive_readout_matches_textbook_attention(grid):
    r = AttentiveReadout(C, 5, width=16, heads=4, num_queries=2, grid=grid, max_frames=9, seeds=[1, 2])
    assert r._folded(2, C)                                   # the folded path is what runs
    f = _feats()
    out = r(f, FI)
    assert out.shape == (2, B, 5)
    for g in range(2):
        y, P = _reference(r, g, f, P_query := r.query[g][None].expand(B, -1, -1))  # noqa: F841
        want = y.mean(1) @ P["head_w"].t() + P["head_b"]
        assert torch.allclose(out[g], want, atol=1e-5), g
    r.path = "plain"                                         # the other path gives the same
    assert torch.allclose(r(f, FI), out, atol=1e-5)


@pytest.mark.parametrize("path", ["auto", "folded"])
def test_dense_readout_matches_textbook_and_shapes(path):
    r = DenseReadout(C, (8, 12), 9, patch=(4, 4), width=16, heads=2, grid=(h, w), init_value=0.7, seeds=[3])
    assert r.mlp_ratio == 1 and not r._folded(4 * 2 * 3, C)   # many queries per latent frame: plain
    r.path = path
    f = _feats()
    out = r(f, FI)
    assert out.shape == (1, B, 9, 8, 12)
    P = {n: p[0] for n, p in r.named_parameters()}
    q = (P["patch_embed"][None] + P["time_embed"][:9, None, None]).reshape(1, -1, 16).expand(B, -1, -1)
    y, _ = _reference(r, 0, f, q, frames=torch.tensor(COVER).repeat_interleave(6))
    patches = (y @ P["head_w"].t() + P["head_b"]).view(B, 9, 2, 3, 4, 4)
    want = patches.permute(0, 1, 2, 4, 3, 5).reshape(B, 9, 8, 12)
    assert torch.allclose(out[0], want, atol=1e-5)
    # The head's bias starts at init_value; patch (row 1, col 2) of frame 5 lands where it should.
    assert torch.allclose(r.head_b, torch.full_like(r.head_b, 0.7))
    assert torch.equal(out[0, :, 5, 4:8, 8:12], patches[:, 5, 1, 2])


@pytest.mark.parametrize("path", ["auto", "folded", "plain"])
def test_point_readout_matches_textbook(path):
    r = PointTrackReadout(C, 9, (32, 48), width=16, heads=2, grid=(h, w), seeds=[4, 6])
    r.path = path
    f = _feats()
    query = torch.tensor([[[0.0, 3.0, 4.0], [6.0, 20.0, 40.0]]] * B) + torch.tensor([[[0.0, 1.5, 2.5]]]) * torch.arange(B)[:, None, None]
    tracks, vis = r(f, FI, query)
    assert tracks.shape == (2, B, 2, 9, 2) and vis.shape == (2, B, 2, 9)
    p = query / torch.tensor([8.0, 32.0, 48.0])
    # The sampled feature, from grid_sample on the latent frame covering the query frame.
    xhat = F.layer_norm(f, (C,))
    sampled = torch.stack([torch.stack([
        F.grid_sample(xhat[b, COVER[int(t)]].permute(2, 0, 1)[None],
                      torch.tensor([[[[2 * float(x) / 48 - 1, 2 * float(y) / 32 - 1]]]]), align_corners=False,
                      padding_mode="border")[0, :, 0, 0]
        for t, y, x in query[b]]) for b in range(B)])
    for g in range(2):
        P = {n: p_[g] for n, p_ in r.named_parameters()}
        tok = _encode_reference(r, P, p, sampled)                                    # (B, N, D)
        queries = (tok[:, None] + P["time_embed"][:9, None]).reshape(B, 18, 16)     # (frame, point)
        y, _ = _reference(r, g, f, queries, frames=torch.tensor(COVER).repeat_interleave(2))
        y = (y @ P["head_w"].t() + P["head_b"]).view(B, 9, 2, 3).transpose(1, 2)
        want = (torch.stack([p[..., 2], p[..., 1]], -1)[:, :, None] + y[..., :2]) * torch.tensor([48.0, 32.0])
        assert torch.allclose(tracks[g], want, atol=1e-4), (path, g)
        assert torch.allclose(vis[g], y[..., 2], atol=1e-5), (path, g)


@pytest.mark.parametrize("path", ["auto", "plain"])
def test_box_readout_matches_textbook(path):
    r = BoxTrackReadout(C, 9, (32, 48), width=16, heads=2, grid=(h, w), seeds=[2])
    assert r._folded(4, C)                                    # one query per frame: folded by default
    r.path = path
    f = _feats()
    box = torch.tensor([[1.0, 2, 10, 20], [20, 8, 47, 31], [5, 5, 5, 5]])        # the last one has no area
    out = r(f, FI, box)
    assert out.shape == (1, B, 9, 4)
    P = {n: p_[0] for n, p_ in r.named_parameters()}
    p = box / torch.tensor([48.0, 32, 48, 32])
    xhat = F.layer_norm(f, (C,))
    pooled = []
    for b in range(B):                                        # token cells weighted by their overlap
        x0, y0, x1, y1 = p[b].tolist()
        wgt = torch.tensor([[max(0.0, min(y1, (i + 1) / h) - max(y0, i / h)) * max(0.0, min(x1, (j + 1) / w) - max(x0, j / w))
                             for j in range(w)] for i in range(h)])
        if wgt.sum() > 0:
            pooled.append((wgt[..., None] * xhat[b, 0]).sum((0, 1)) / wgt.sum())
        else:
            pooled.append(F.grid_sample(xhat[b, 0].permute(2, 0, 1)[None], torch.tensor([[[[2 * x0 - 1, 2 * y0 - 1]]]]),
                                        align_corners=False, padding_mode="border")[0, :, 0, 0])
    tok = _encode_reference(r, P, p, torch.stack(pooled))                             # (B, D)
    y, _ = _reference(r, 0, f, tok[:, None] + P["time_embed"][:9], frames=COVER)
    want = (p[:, None] + y @ P["head_w"].t() + P["head_b"]) * torch.tensor([48.0, 32, 48, 32])
    assert torch.allclose(out[0], want, atol=1e-4)


def test_covering_frames():
    assert covering_frames(torch.tensor([0, 4, 8, 12, 16]), 17).tolist() == [0] + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert covering_frames(torch.arange(17), 17).tolist() == list(range(17))
    assert covering_frames(FI, 9).tolist() == COVER
    with pytest.raises(ValueError, match="does not cover"):
        covering_frames(FI, 10)
    with pytest.raises(ValueError, match="increasing"):
        covering_frames(torch.tensor([0, 8, 4]), 9)


def test_sampling_and_pooling_helpers():
    xhat = torch.arange(2 * 2 * 4, dtype=torch.float32).view(1, 16, 1)          # 2 latent frames of 2 x 4
    # Token centres sit at ((i + 0.5) / h, (j + 0.5) / w); halfway between two is their mean.
    s = sample_features(xhat, (2, 4), torch.tensor([[1, 1, 0]]), torch.tensor([[0.25, 0.5, 0.0]]),
                        torch.tensor([[0.125, 0.25, 1.0]]))
    assert s[0, :, 0].tolist() == [8.0, 10.5, 3.0]
    box = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.5, 1.0]])              # (x0, y0, x1, y1)
    assert pool_box(xhat.expand(2, -1, -1), (2, 4), 1, box)[:, 0].tolist() == [8.5, 11.0]


@pytest.mark.parametrize("kind", ["depth", "point", "box"])
@pytest.mark.parametrize("fi", [FI, torch.arange(9)])
def test_per_frame_readouts_see_only_the_covering_latent_frame(kind, fi):
    """Changing the features of one latent frame changes the outputs of the frames it covers (and
    of what reads it to build a query: the point's query frame, the first box) and nothing else."""
    f = torch.randn(B, len(fi), h, w, C, generator=torch.Generator().manual_seed(0))
    cover = covering_frames(fi, 9)
    if kind == "depth":
        r, extra, frames_of = DenseReadout(C, (8, 8), 9, patch=2, width=16, heads=2, grid=(h, w), seeds=[0, 1]), (), lambda y: y
    elif kind == "point":
        r = PointTrackReadout(C, 9, (16, 16), width=16, heads=2, grid=(h, w), seeds=[0, 1])
        extra, frames_of = (torch.tensor([[[0.0, 4, 5], [0.0, 9, 9]]] * B),), lambda y: y[0].transpose(2, 3)
    else:
        r = BoxTrackReadout(C, 9, (16, 16), width=16, heads=2, grid=(h, w), seeds=[0, 1])
        extra, frames_of = (torch.tensor([[2.0, 2, 9, 12]] * B),), lambda y: y
    with torch.no_grad():
        base = frames_of(r(f, fi, *extra))                     # (G, B, 9, ...): frame axis 2
        for j in range(1, len(fi)):                            # latent frame 0 feeds every query
            g = f.clone()
            g[:, j] = torch.randn(B, h, w, C, generator=torch.Generator().manual_seed(j))
            out = frames_of(r(g, fi, *extra))
            for t in range(9):
                same = torch.allclose(out[:, :, t], base[:, :, t], atol=1e-6)
                assert same == (int(cover[t]) != j), (kind, j, t)
        if kind != "depth":                                    # ... and latent frame 0 does
            g = f.clone()
            g[:, 0] = torch.randn(B, h, w, C)
            out = frames_of(r(g, fi, *extra))
            assert all(not torch.allclose(out[:, :, t], base[:, :, t]) for t in range(9))


def test_group_member_equals_single_readout_with_its_seed():
    f = _feats(dtype=torch.float16)                          # float16 features are accepted
    group = PointTrackReadout(C, 9, (32, 32), width=16, heads=2, grid=(h, w), seeds=[5, 7, 9])
    alone = PointTrackReadout(C, 9, (32, 32), width=16, heads=2, grid=(h, w), seeds=[7])
    for (n, p), (_, p1) in zip(group.named_parameters(), alone.named_parameters()):
        assert torch.equal(p[1], p1[0]), n
    query = torch.tensor([[[0, 3.0, 4.0]] * 2] * B)
    tg, vg = group(f, FI, query)
    t1, v1 = alone(f, FI, query)
    assert tg.shape == (3, B, 2, 9, 2) and vg.shape == (3, B, 2, 9)
    assert torch.allclose(tg[1], t1[0], atol=1e-5) and torch.allclose(vg[1], v1[0], atol=1e-5)


def test_shapes_single_readouts_and_gradients():
    f = _feats()
    torch.manual_seed(0)
    cases = [
        (AttentiveReadout(C, 4, width=16, grid=(h, w), max_frames=9), (), (B, 4)),
        (PoseReadout(C, width=16, grid=(h, w), max_frames=9), (), (B, 12)),
        (DenseReadout(C, (16, 16), 9, patch=4, width=16, grid=(h, w)), (), (B, 9, 16, 16)),
        (BoxTrackReadout(C, 9, (32, 48), width=16, grid=(h, w)), (torch.tensor([[1.0, 2, 10, 20]] * B),), (B, 9, 4)),
    ]
    for r, extra, shape in cases:
        out = r(f, FI, *extra)
        assert out.shape == shape, type(r).__name__
        out.square().mean().backward()
        for n, p in r.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (type(r).__name__, n)
        assert sum(float(p.grad.abs().sum()) for p in r.parameters()) > 0
    tracks, vis = PointTrackReadout(C, 9, (32, 48), width=16, grid=(h, w))(f, FI, torch.tensor([[[2.0, 5, 6]]] * B))
    assert tracks.shape == (B, 1, 9, 2) and vis.shape == (B, 1, 9)


def test_untrained_geometry_readouts_start_from_the_input():
    f = _feats()
    pose = PoseReadout(C, width=16, grid=(h, w), max_frames=9, seeds=[0])
    with torch.no_grad():
        pose.head_w.zero_()
    assert torch.allclose(pose(f, FI)[0], torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]).expand(B, 12))
    box = BoxTrackReadout(C, 9, (32, 48), width=16, grid=(h, w), seeds=[0])
    with torch.no_grad():
        box.head_w.zero_()
    b0 = torch.tensor([[1.0, 2, 10, 20]] * B)
    assert torch.allclose(box(f, FI, b0)[0], b0[:, None].expand(B, 9, 4), atol=1e-5)


def test_clear_errors():
    r = AttentiveReadout(C, 4, width=16, grid=(h, w), max_frames=5)
    with pytest.raises(ValueError, match=r"\(B, T', h, w, 8\)"):
        r(torch.zeros(B, TL, h, w, C + 1), FI)
    with pytest.raises(ValueError, match="frame_index"):
        r(_feats(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="max_frames"):
        r(_feats(), FI)                                       # frame 8 of a 5-frame readout
    with pytest.raises(ValueError, match="multiple"):
        DenseReadout(C, (10, 10), 3, patch=4)


def test_normalize_features_is_layer_norm_without_affine():
    f = _feats() * 3 + 1
    x = normalize_features(f)
    assert x.shape == (B, TL * h * w, C)
    assert torch.allclose(x.mean(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(x.var(-1, unbiased=False), torch.ones(()), atol=1e-3)


def _planted(n, k, seed, strength=1.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    codes = torch.randn(k, C, generator=torch.Generator().manual_seed(99))
    f = torch.randn(n, TL, h, w, C, generator=g)
    f[:, 1] += strength * codes[labels][:, None, None]         # the tokens of one latent frame carry the label
    return f, labels


def _train(r, f, y, steps=80, lr=1e-2):
    opt = torch.optim.AdamW(r.parameters(), lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(len(y), generator=gen)[:32]
        loss = F.cross_entropy(r(f[idx], FI), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_readout_learns_a_planted_label_and_not_shuffled_ones():
    k = 4
    f_tr, y_tr = _planted(128, k, 0)
    f_te, y_te = _planted(128, k, 1)
    torch.manual_seed(0)
    r = AttentiveReadout(C, k, width=16, heads=4, grid=(h, w), max_frames=9)
    _train(r, f_tr, y_tr)
    with torch.no_grad():
        acc = (r(f_te, FI).argmax(-1) == y_te).float().mean().item()
    assert acc > 0.9
    torch.manual_seed(0)
    r = AttentiveReadout(C, k, width=16, heads=4, grid=(h, w), max_frames=9)
    shuffled = y_tr[torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(3))]
    _train(r, f_tr, shuffled)
    with torch.no_grad():
        acc = (r(f_te, FI).argmax(-1) == y_te).float().mean().item()
    assert acc < 1 / k + 0.15                                  # chance is 0.25


def _drift_by_point(n, seed, Q=4, S=16):
    """Every token cell of latent frame 0 carries its own velocity (channels 0-1); a point queried
    in frame 0 moves with the velocity of its cell. The other latent frames are noise, so with
    frame-local attention the only way to the velocity is the feature sampled at the query."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, TL, h, w, C, generator=g)
    vel = torch.rand(n, h, w, 2, generator=g) * 2 - 1                        # px / frame, (vx, vy)
    f[:, 0, :, :, :2] += 2 * vel
    cells = torch.stack([torch.randperm(h * w, generator=g)[:Q] for _ in range(n)])  # (n, Q)
    cy, cx = cells // w, cells % w
    y, x = (cy.float() + 0.5) * S / h, (cx.float() + 0.5) * S / w
    query = torch.stack([torch.zeros_like(y), y, x], -1)
    v = vel[torch.arange(n)[:, None], cy, cx]                                # (n, Q, 2)
    t = torch.arange(9).float()
    tracks = torch.stack([x, y], -1)[:, :, None] + v[:, :, None] * t[:, None]  # (n, Q, 9, 2)
    return f, query, tracks


def test_point_readout_reads_the_feature_at_the_query():
    f_tr, q_tr, y_tr = _drift_by_point(256, 0)
    f_te, q_te, y_te = _drift_by_point(128, 1)
    torch.manual_seed(0)
    r = PointTrackReadout(C, 9, (16, 16), width=16, heads=2, grid=(h, w), seeds=[0])
    opt = torch.optim.AdamW(r.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randperm(len(f_tr), generator=gen)[:32]
        tracks, _ = r(f_tr[idx], FI, q_tr[idx])
        loss = F.huber_loss(tracks[0] / 16, y_tr[idx] / 16, delta=1 / 32)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def error():
        with torch.no_grad():
            return (r(f_te, FI, q_te)[0][0] - y_te)[:, :, 1:].norm(dim=-1).mean().item()

    still = (q_te[..., [2, 1]][:, :, None] - y_te)[:, :, 1:].norm(dim=-1).mean().item()
    got = error()
    assert got < 0.8 * still, (got, still)                     # (velocity x time is learnt slowly)
    with torch.no_grad():
        r.samp_w.zero_()                                       # without the sampled feature ...
    blind = error()
    assert blind > 1.3 * got and blind > 0.9 * still, (blind, got, still)  # ... the velocity is lost
