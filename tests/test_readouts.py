"""Readout heads: shapes, gradients, the folded attention against the textbook one, groups."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probes.readouts import (AttentiveReadout, BoxTrackReadout, DenseReadout, PointTrackReadout, PoseReadout,
                             normalize_features)

torch.set_num_threads(1)
B, TL, h, w, C = 3, 3, 4, 4, 8
FI = torch.tensor([0, 4, 8])                      # V-WALT style: latent frames for input frames 0, 4, 8


def _feats(seed=0, dtype=torch.float32):
    return torch.randn(B, TL, h, w, C, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _reference(r, g, feats, queries):
    """Member g of readout r, written out plainly: LayerNorm, linear, embeddings, multi-head
    cross-attention over all tokens with explicit k and v, residual MLP."""
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
    a = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    o = (a @ v).transpose(1, 2).reshape(B, -1, D)
    y = queries + o @ P["out_w"].t() + P["out_b"]
    m = F.layer_norm(y, (D,), P["ln_w"], P["ln_b"])
    return y + F.gelu(m @ P["mlp1_w"].t() + P["mlp1_b"]) @ P["mlp2_w"].t() + P["mlp2_b"], P


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


def test_dense_readout_matches_textbook_and_shapes():
    r = DenseReadout(C, (8, 12), 9, patch=(4, 4), width=16, heads=2, grid=(h, w), init_value=0.7, seeds=[3])
    assert not r._folded(9 * 2 * 3, C)                       # many queries: the plain path
    f = _feats()
    out = r(f, FI)
    assert out.shape == (1, B, 9, 8, 12)
    P = {n: p[0] for n, p in r.named_parameters()}
    q = (P["patch_embed"][None] + P["time_embed"][:9, None, None]).reshape(1, -1, 16).expand(B, -1, -1)
    y, _ = _reference(r, 0, f, q)
    patches = (y @ P["head_w"].t() + P["head_b"]).view(B, 9, 2, 3, 4, 4)
    want = patches.permute(0, 1, 2, 4, 3, 5).reshape(B, 9, 8, 12)
    assert torch.allclose(out[0], want, atol=1e-5)
    # The head's bias starts at init_value; patch (row 1, col 2) of frame 5 lands where it should.
    assert torch.allclose(r.head_b, torch.full_like(r.head_b, 0.7))
    assert torch.equal(out[0, :, 5, 4:8, 8:12], patches[:, 5, 1, 2])


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
