"""Fitting readouts: planted signals are learned, the grid picks its lr on val, and a grid member
trains exactly like the same readout trained alone."""
import zlib

import numpy as np
import pytest
import torch

from probes import metrics as M
from probes.fit import ArraySource, fit
from probes.tasks import TASKS, get_task
from walt.train.schedule import lr_factor

torch.set_num_threads(1)
TL, h, w, C, T, S = 3, 4, 4, 8, 5, 16            # 3 latent frames for 5 input frames of 16 x 16
FI = np.array([0, 2, 4])
SMALL = dict(width=16, heads=2, batch_size=32, progress=False, device="cpu")  # exact checks: the CPU's numbers


def _split(n, seed, task):
    """Features with a planted per-clip signal z (channels 0-1) and the task's targets."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    z = rng.uniform(-1, 1, (n, 2))
    f = rng.normal(size=(n, TL, h, w, C)).astype(np.float32)
    f[..., :2] += 2 * z[:, None, None, None, :]
    d = {"features": f.astype(np.float16), "frame_index": FI, "image_size": (S, S)}
    if task == "object":
        labels = (z[:, 0] > 0).astype(np.int64) + 2 * (z[:, 1] > 0)
        d["labels"] = {"object": labels}
        d["label_names"] = {"object": ["a", "b", "c", "d"]}
    elif task == "depth":
        ramp = 1 + 0.5 * (np.arange(S) + 0.5) / S
        d["depth"] = (2 * np.exp(z[:, 0])[:, None, None, None] * ramp[None, None, :, None]
                      * np.ones((1, T, 1, S))).astype(np.float32)
        d["depth"][:, :, 0, 0] = 40.0                       # a backdrop pixel, never scored
    elif task == "camera_pose":
        c = np.tile(np.eye(4), (n, T, 1, 1))
        a0 = rng.uniform(-np.pi, np.pi, n)
        c[:, :, 0, 0], c[:, :, 0, 1], c[:, :, 1, 0], c[:, :, 1, 1] = (
            np.cos(a0)[:, None], -np.sin(a0)[:, None], np.sin(a0)[:, None], np.cos(a0)[:, None])
        c[:, :, :3, 3] = rng.normal(size=(n, 1, 3))
        rel = np.tile(np.eye(4), (n, 1, 1))
        th = z[:, 0] * np.pi / 3
        rel[:, 0, 0], rel[:, 0, 1], rel[:, 1, 0], rel[:, 1, 1] = np.cos(th), -np.sin(th), np.sin(th), np.cos(th)
        rel[:, 0, 3] = z[:, 1]
        c[:, -1] = c[:, 0] @ rel
        d["cam_to_world"] = c
    elif task == "point_tracking":
        # The scene drifts by v px / frame (v planted in the features); queries in frame 0, so
        # a point is at q + v t (a drift that depends on the query frame too is learnt, but
        # more slowly than a test should wait for).
        Q = 4
        v = 1.5 * z
        t0 = np.zeros((n, Q))
        yx = rng.uniform(4, 12, (n, Q, 2))
        d["query"] = np.concatenate([t0[..., None], yx], -1)
        dt = np.arange(T)[None, None, :] - t0[..., None]
        d["tracks"] = np.stack([yx[..., 1, None] + v[:, None, None, 0] * dt,
                                yx[..., 0, None] + v[:, None, None, 1] * dt], -1)
        d["visible"] = np.ones((n, Q, T), bool)
    elif task == "box_tracking":
        v = 1.5 * z
        b0 = rng.uniform(2, 8, (n, 2))
        t = np.arange(T)[None, :, None]
        x0, y0 = b0[:, None, 0:1] + v[:, None, 0:1] * t, b0[:, None, 1:2] + v[:, None, 1:2] * t
        boxes = np.zeros((n, T, 2, 4))
        boxes[:, :, 0] = np.concatenate([x0, y0, x0 + 6, y0 + 6], -1)
        boxes[:, :, 1] = [0, 0, 3, 3]
        d["boxes"], d["box_valid"] = boxes, np.ones((n, T, 2), bool)
    return d


def _data(task, n=(96, 48, 48)):
    return [_split(k, seed, task) for k, seed in zip(n, (0, 1, 2))]


def test_registry_names_and_unavailable_tasks():
    assert set(TASKS) == {"object", "scene", "texture", "appearance", "motion", "depth", "camera_pose",
                          "point_tracking", "box_tracking"}
    d = _split(4, 0, "object")
    assert get_task("object").missing(d) is None
    assert get_task("depth").missing(d) == ("task 'depth' is unavailable: the data has no 'depth' "
                                            "(expected (N, T, H, W) depth in metres)")
    assert "'labels/scene'" in get_task("scene").missing(d)
    assert "'visible'" in get_task("point_tracking").missing({**d, "query": 1, "tracks": 1})
    with pytest.raises(ValueError, match="no 'depth'.*train split"):
        fit("depth", d, d, d, **SMALL)
    with pytest.raises(ValueError, match="unknown task 'dept'"):
        get_task("dept")


def test_grid_learns_a_planted_label_and_chooses_lr_on_val():
    tr, va, te = _data("object")
    r = fit("object", tr, va, te, lrs=(1e-6, 1e-2), seeds=(0, 1), epochs=25, **SMALL)
    assert r["task"] == "object" and r["primary"] == "top1" and r["higher_is_better"]
    assert len(r["val"]) == 4 and {(v["lr"], v["seed"]) for v in r["val"]} == {(a, b) for a in (1e-6, 1e-2) for b in (0, 1)}
    for s in ("0", "1"):
        best = max((v for v in r["val"] if str(v["seed"]) == s), key=lambda v: v["score"])
        assert r["chosen_lr"][s] == best["lr"] == 1e-2
        assert r["test"]["per_seed"][s]["top1"] > 0.8           # chance: 0.25; labels near z = 0 are ambiguous
        assert len(r["test_per_clip"][s]) == 48
        assert np.mean(r["test_per_clip"][s]) == pytest.approx(r["test"]["per_seed"][s]["top1"])
    tiny = [v["score"] for v in r["val"] if v["lr"] == 1e-6]
    assert max(tiny) < 0.6                                   # an lr that barely moves stays near chance
    assert r["test"]["mean"]["top1"] == pytest.approx(np.mean([r["test"]["per_seed"][s]["top1"] for s in "01"]))


def test_grid_member_equals_the_same_readout_trained_alone():
    tr, va, te = _data("object", (64, 16, 16))
    task = get_task("object")
    lrs, seeds, epochs, bs = (1e-3, 1e-2), (0, 1), 3, 16
    r = fit(task, tr, va, te, lrs=lrs, seeds=seeds, epochs=epochs, width=16, heads=2, batch_size=bs,
            progress=False, return_readout=True, device="cpu")
    group = r["readout"]

    spec = task.spec(ArraySource(tr).data)
    alone = task.build(spec, width=16, heads=2, seeds=[1])
    decay = alone.decay_mask()
    opt = torch.optim.AdamW([
        {"params": [p for n, p in alone.named_parameters() if decay[n]], "weight_decay": 0.05},
        {"params": [p for n, p in alone.named_parameters() if not decay[n]], "weight_decay": 0.0},
    ], lr=1e-2)
    total = epochs * (64 // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, max(1, round(0.1 * total)), total))
    rng = np.random.default_rng(0)
    fi = torch.from_numpy(FI)
    for _ in range(epochs):
        perm = rng.permutation(64)
        for i in range(64 // bs):
            idx = np.sort(perm[i * bs:(i + 1) * bs])
            b = {"features": torch.from_numpy(tr["features"][idx]),
                 "labels/object": torch.from_numpy(tr["labels"]["object"][idx])}
            loss = task.loss(alone(b["features"], fi), b, spec)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            sched.step()
    g = lrs.index(1e-2) * len(seeds) + seeds.index(1)
    for n, p in alone.named_parameters():
        assert torch.allclose(getattr(group, n)[g], p[0], atol=2e-5, rtol=1e-4), n
    moved = sum(float((p[0] - q[0]).detach().abs().max()) for p, q in zip(
        alone.parameters(), task.build(spec, width=16, heads=2, seeds=[1]).parameters()))
    assert moved > 1e-2                                       # training did change the readout


def test_depth_signal_beats_a_constant_predictor():
    tr, va, te = _data("depth")
    r = fit("depth", tr, va, te, lrs=(3e-3, 1e-2), epochs=30, **SMALL)
    # The best constant: the training set's mean log-depth, pixel by pixel.
    valid = M.depth_valid(tr["depth"])
    const = np.exp((np.log(tr["depth"]) * valid).sum(0) / np.maximum(valid.sum(0), 1))
    base = np.nanmean(M.depth_metrics(np.broadcast_to(const, te["depth"].shape), te["depth"])["abs_rel"])
    got = r["test"]["mean"]["abs_rel"]
    assert base > 0.3 and got < 0.5 * base, (got, base)
    assert r["test"]["mean"]["d1"] > 0.8
    assert not r["higher_is_better"]


def test_pose_signal_beats_a_constant_predictor():
    tr, va, te = _data("camera_pose")
    r = fit("camera_pose", tr, va, te, lrs=(3e-3, 1e-2), epochs=30, **SMALL)
    gt_tr = M.pose12_from_cam_to_world(tr["cam_to_world"])
    gt_te = M.pose12_from_cam_to_world(te["cam_to_world"])
    base = M.relative_pose_errors(np.broadcast_to(gt_tr.mean(0), gt_te.shape), gt_te)
    got = r["test"]["mean"]
    assert got["epe"] < 0.5 * base["epe"].mean(), (got, base["epe"].mean())
    assert got["rotation_deg"] < 0.5 * base["rotation_deg"].mean()
    assert set(got) == {"rotation_deg", "translation", "epe"} and r["primary"] == "epe"


def test_point_tracks_beat_standing_still():
    tr, va, te = _data("point_tracking")
    r = fit("point_tracking", tr, va, te, lrs=(3e-3, 1e-2), epochs=30, **SMALL)
    s = 256 / S
    q = te["query"] * np.array([1, s, s])
    still = np.broadcast_to(te["query"][..., None, [2, 1]], te["tracks"].shape) * s
    occ = ~te["visible"]
    base = M.tapvid_metrics(q, occ, te["tracks"] * s, occ, still, "strided")["average_jaccard"].mean()
    got = r["test"]["mean"]
    assert got["average_jaccard"] > max(2 * base, base + 0.05), (got, base)
    assert got["occlusion_accuracy"] > 0.95
    assert r["primary"] == "average_jaccard"


def test_box_tracks_beat_the_first_box():
    tr, va, te = _data("box_tracking")
    r = fit("box_tracking", tr, va, te, lrs=(3e-3, 1e-2), epochs=30, **SMALL)
    first = np.broadcast_to(te["boxes"][:, :1, 0], te["boxes"][:, :, 0].shape)
    base = M.box_iou(first, te["boxes"][:, :, 0])[:, 1:].mean()
    got = r["test"]["mean"]["mean_iou"]
    assert got > base + 0.1, (got, base)



def test_depth_loss_matches_its_textbook_form_and_gradient():
    """The fused masked L1 against autograd through |out - log gt| * valid, in float64."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 2, T, S, S, dtype=torch.float64, generator=g, requires_grad=True)
    gt = torch.rand(2, T, S, S, dtype=torch.float64, generator=g) * 12      # some beyond 10 m
    gt[0, 0, 0, :4] = 0.0
    loss = get_task("depth").loss(out, {"depth": gt}, None)
    valid = ((gt.float() > M.DEPTH_MIN) & (gt.float() < M.DEPTH_MAX)).double()
    target = torch.log(gt.float().clamp(min=M.DEPTH_MIN)).double()
    ref = ((out - target).abs() * valid).flatten(1).sum(1) / valid.sum()
    torch.testing.assert_close(loss, ref)
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    got, = torch.autograd.grad((loss * w).sum(), out)
    want, = torch.autograd.grad((ref * w).sum(), out)
    torch.testing.assert_close(got, want)
    assert float(got[:, 0, 0, 0, :4].abs().max()) == 0.0                    # invalid pixels get no gradient


def test_primary_score_equals_the_full_metrics_primary():
    tr, va, te = _data("depth", n=(8, 8, 8))
    task = get_task("depth")
    spec = task.spec(tr)
    rng = np.random.default_rng(0)
    out = np.log(va["depth"]) + rng.normal(0, 0.2, va["depth"].shape)
    full = task.score(task.metrics(out, va, spec))[task.primary]
    assert task.primary_score(out, va, spec) == full
    assert get_task("object").primary_score(np.eye(4)[[0, 1, 2, 3]], {"labels/object": np.arange(4)}, {}) == 1.0


def test_device_choice_fails_in_one_sentence():
    from probes.fit import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'cuda\\[:index\\]', got 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            fit("object", *_data("object", n=(8, 8, 8)), **{**SMALL, "device": "cuda"})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("task", ["object", "depth", "point_tracking"])
def test_a_grid_fitted_on_the_gpu_matches_the_cpu(task):
    """The same grid on both devices trains to the same place. Not bitwise: GPU and CPU sum in
    other orders, and Adam's first steps turn a near-zero gradient's sign into a whole step, so
    the check is that losses and scores agree to a few percent."""
    splits = _data(task, n=(64, 32, 32))
    kw = dict(SMALL, lrs=(1e-3, 3e-3), seeds=(0,), epochs=3)
    cpu = fit(task, *splits, **kw)
    gpu = fit(task, *splits, **{**kw, "device": "cuda"})
    assert gpu["device"] == "cuda" and cpu["device"] == "cpu"
    for a, b in zip(cpu["val"], gpu["val"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05)
        assert b["score"] == pytest.approx(a["score"], abs=0.05)
