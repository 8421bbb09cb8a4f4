"""WALT: presets, parameter counts, frame isolation (I-WALT), window isolation, feature taps."""
import dataclasses

import pytest
import torch

from walt.models import TRANSFORMER_PRESETS, WALT, TransformerConfig, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**over):
    return TransformerConfig(**{**TRANSFORMER_PRESETS["cpu"], **over})


def _model(seed=0, **over):
    """A small model with every parameter random: adaLN-zero init would make blocks identities."""
    torch.manual_seed(seed)
    m = WALT(_cfg(**over))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def _inputs(B=2, T=5, H=8, W=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, W, 8, generator=g), torch.randint(0, 1000, (B,), generator=g)


@pytest.mark.parametrize("preset", list(TRANSFORMER_PRESETS))
def test_preset_shapes_on_meta_and_equal_counts(preset):
    counts = {}
    for mode in ("video", "image"):
        with torch.device("meta"):
            m = WALT(TransformerConfig(**TRANSFORMER_PRESETS[preset], mode=mode))
            T, H, W = m.cfg.input_size
            x = torch.empty(2, T, H, W, 8)
            out = m(x, torch.zeros(2, dtype=torch.long), self_cond=x)
            feats = m.forward_features(x, torch.zeros(2, dtype=torch.long), blocks=[0, m.cfg.depth * 2 // 3])
        assert out.shape == x.shape
        assert feats[0].shape == (2, T, H, W, m.cfg.width)
        counts[mode] = count_parameters(m)
    assert counts["video"] == counts["image"]


@pytest.mark.parametrize("preset,lo,hi", [("L", 290e6, 330e6), ("XL", 440e6, 480e6), ("G", 1.8e9, 2.0e9)])
def test_paper_sizes(preset, lo, hi):
    with torch.device("meta"):
        n = count_parameters(WALT(TransformerConfig(**TRANSFORMER_PRESETS[preset])))
    assert lo < n < hi


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_image_mode_never_mixes_frames_video_mode_does(backend):
    x, t = _inputs()
    y = x.clone()
    y[:, 3] += torch.randn_like(y[:, 3])
    for mode in ("image", "video"):
        m = _model(mode=mode, attention_backend=backend)
        with torch.no_grad():
            fx = m.forward_features(x, t, blocks=[1, 3])
            fy = m.forward_features(y, t, blocks=[1, 3])
            ox, oy = m(x, t), m(y, t)
        others = [0, 1, 2, 4]
        delta = max((fx[b][:, others] - fy[b][:, others]).abs().amax().item() for b in (1, 3))
        delta = max(delta, (ox[:, others] - oy[:, others]).abs().amax().item())
        if mode == "image":
            assert delta == 0.0
            assert (fx[3][:, 3] - fy[3][:, 3]).abs().amax() > 1e-3  # the changed frame itself does change
        else:
            assert delta > 1e-3


@pytest.mark.parametrize("mode", ["video", "image"])
def test_fused_and_reference_backends_agree(mode):
    x, t = _inputs()
    outs, grads = [], []
    for backend in ("torch", "fused"):
        m = _model(mode=mode, attention_backend=backend, spatial_window=(1, 8, 6), spatiotemporal_window=(2, 3, 4))
        out = m(x, t, self_cond=torch.randn_like(x, generator=torch.Generator().manual_seed(5)))
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-3, msg=n)


def test_image_mode_is_per_frame_with_shared_weights():
    """I-WALT on a clip = I-WALT on each frame alone (temporal position 0 for all)."""
    m = _model(mode="image")
    x, t = _inputs(T=3)
    with torch.no_grad():
        clip = m(x, t)
        for i in range(3):
            torch.testing.assert_close(clip[:, i : i + 1], m(x[:, i : i + 1], t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_window_isolation(backend):
    """A change at token (0, 0, 0) stays inside its spatial window after block 0 (1x4x4) and
    inside the spatiotemporal window (5x4x4) after block 1."""
    m = _model(attention_backend=backend, spatial_window=(1, 4, 4), spatiotemporal_window=(5, 4, 4))
    x, t = _inputs()
    y = x.clone()
    y[:, 0, 0, 0] += 1.0
    with torch.no_grad():
        fx = m.forward_features(x, t, blocks=[0, 1])
        fy = m.forward_features(y, t, blocks=[0, 1])
    changed = [(fx[b] - fy[b]).abs().amax(dim=(0, 4)) > 0 for b in (0, 1)]
    inside0 = torch.zeros(5, 8, 8, dtype=torch.bool)
    inside0[0, :4, :4] = True
    inside1 = torch.zeros(5, 8, 8, dtype=torch.bool)
    inside1[:, :4, :4] = True
    assert not changed[0][~inside0].any() and changed[0][inside0].all()
    assert not changed[1][~inside1].any() and changed[1][inside1].all()


def test_feature_taps_match_the_forward_pass_and_stop_early():
    m = _model()
    x, t = _inputs()
    with torch.no_grad():
        many = m.forward_features(x, t, blocks=[0, 2, -1])
        one = m.forward_features(x, t, blocks=[2])
        last = m.forward_features(x, t, blocks=[3])
    torch.testing.assert_close(many[2], one[2], rtol=0, atol=0)
    torch.testing.assert_close(many[-1], last[3], rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        m.forward_features(x, t, blocks=[4])


def test_self_conditioning_and_class_labels_enter():
    m = _model(num_classes=3)
    x, t = _inputs()
    with torch.no_grad():
        base = m(x, t)
        assert torch.equal(base, m(x, t, self_cond=torch.zeros_like(x)))
        assert (base - m(x, t, self_cond=torch.randn_like(x))).abs().amax() > 1e-3
        assert (base - m(x, t, y=torch.tensor([0, 1]))).abs().amax() > 1e-3
        assert (base - m(x, t + 100)).abs().amax() > 1e-3


def test_image_mode_trains_only_the_centre_of_spatiotemporal_tables():
    m = _model(mode="image")
    x, t = _inputs(T=1)
    m(x, t).square().mean().backward()
    g = m.blocks[1].attn.rel_pos_bias.grad  # spatiotemporal table (heads, 9, 7, 7)
    assert g[:, 4].abs().amax() > 0
    assert torch.count_nonzero(torch.cat([g[:, :4], g[:, 5:]], 1)) == 0


def test_patch_size_two_round_trips():
    m = _model(patch_size=2)
    x, t = _inputs()
    assert torch.equal(m.unpatchify(m.patchify(x)), x)
    with torch.no_grad():
        assert m(x, t).shape == x.shape
        assert m.forward_features(x, t, blocks=[0])[0].shape == (2, 5, 4, 4, 64)


def test_adaln_zero_init_outputs_zero():
    torch.manual_seed(0)
    m = WALT(_cfg())
    x, t = _inputs()
    assert m(x, t).abs().amax() == 0  # DiT's adaLN-zero: training starts from the identity
    assert count_parameters(m) == count_parameters(WALT(dataclasses.replace(_cfg(), mode="image")))


def test_bad_input_is_one_clear_sentence():
    m = _model()
    with pytest.raises(ValueError, match="channels-last"):
        m(torch.zeros(1, 5, 8, 8, 3), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's input_size"):
        m(torch.zeros(1, 6, 8, 8, 8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_backend"):
        _model(attention_backend="flash")(*_inputs())


@pytest.mark.filterwarnings("ignore:Mismatch dtype")
def test_bf16_autocast_runs_and_stays_close():
    m = _model()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.25)  # keep activations moderate so bf16 rounding stays small relative to them
    x, t = _inputs()
    ref = m(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, self_cond=x)
        low = m(x, t)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    assert (low.float() - ref).abs().amax() < 0.05 * ref.abs().amax()
