"""Probe metrics against hand-computed values and the edge cases of their published definitions."""
import math

import numpy as np
import pytest

from probes import metrics as M


# ------------------------------------------------------------------------------ TAP-Vid

def _two_points():
    """Two tracks over 4 frames, worked out by hand below.

    Point 0: query at t=0, visible throughout at (10, 10); predicted visible, off by 0.5, 3 and
    20 px in frames 1, 2, 3. Point 1: query at t=1, occluded in frame 3 only; predicted exactly,
    but predicted occluded in frames 2 (wrong) and 3 (right).
    """
    q = np.array([[[0, 10, 10], [1, 50, 40]]], float)
    gt = np.zeros((1, 2, 4, 2))
    gt[0, 0] = (10, 10)
    gt[0, 1] = (40, 50)
    pred = gt.copy()
    pred[0, 0, 1] = (10.5, 10)
    pred[0, 0, 2] = (13, 10)
    pred[0, 0, 3] = (30, 10)
    gt_occ = np.zeros((1, 2, 4), bool)
    gt_occ[0, 1, 3] = True
    pred_occ = np.zeros((1, 2, 4), bool)
    pred_occ[0, 1, 2:] = True
    return q, gt_occ, gt, pred_occ, pred


def test_tapvid_first_by_hand():
    m = M.tapvid_metrics(*_two_points(), query_mode="first")
    # Scored: point 0 frames 1-3, point 1 frames 2-3; 4 of them visible.
    assert m["occlusion_accuracy"] == pytest.approx([0.8])
    for d, pts, jac in [(1, 0.5, 1 / 6), (2, 0.5, 1 / 6), (4, 0.75, 0.4), (8, 0.75, 0.4), (16, 0.75, 0.4)]:
        assert m[f"pts_within_{d}"] == pytest.approx([pts]), d
        assert m[f"jaccard_{d}"] == pytest.approx([jac]), d
    assert m["average_pts_within_thresh"] == pytest.approx([0.65])
    assert m["average_jaccard"] == pytest.approx([(2 / 6 + 1.2) / 5])
    assert m["average_jaccard"].shape == (1,)


def test_tapvid_strided_by_hand():
    m = M.tapvid_metrics(*_two_points(), query_mode="strided")
    # Strided adds point 1's frame 0 (before its query): visible, exact, predicted visible.
    assert m["occlusion_accuracy"] == pytest.approx([5 / 6])
    assert m["pts_within_1"] == pytest.approx([0.6])
    assert m["jaccard_1"] == pytest.approx([2 / 7])
    assert m["pts_within_4"] == pytest.approx([0.8])
    assert m["jaccard_4"] == pytest.approx([0.5])
    per_track = M.tapvid_metrics(*_two_points(), query_mode="strided", per_track=True)
    assert per_track["pts_within_1"].shape == (1, 2)
    assert per_track["pts_within_1"][0] == pytest.approx([1 / 3, 1.0])


def test_tapvid_thresholds_are_strict():
    q = np.zeros((1, 1, 3))
    gt = np.zeros((1, 1, 2, 2))
    pred = gt.copy()
    pred[0, 0, 1] = (1.0, 0.0)                    # exactly 1 px away: not within 1, within 2
    occ = np.zeros((1, 1, 2), bool)
    m = M.tapvid_metrics(q, occ, gt, occ, pred, "first")
    assert m["pts_within_1"][0] == 0.0 and m["pts_within_2"][0] == 1.0


def test_tapvid_perfect_and_batched():
    rng = np.random.default_rng(0)
    B, N, T = 3, 5, 6
    q = np.stack([rng.integers(0, T, (B, N)), rng.uniform(0, 256, (B, N)), rng.uniform(0, 256, (B, N))], -1)
    tracks = rng.uniform(0, 256, (B, N, T, 2))
    occ = rng.random((B, N, T)) < 0.3
    occ[..., 0] = False
    occ[..., -1] = False                           # every video keeps visible scored frames
    m = M.tapvid_metrics(q, occ, tracks, occ, tracks, "strided")
    for k, v in m.items():
        assert v.shape == (B,) and np.allclose(v, 1.0), k


def test_tapvid_no_visible_points_follows_tapnet_divisions():
    q = np.zeros((2, 2, 3))
    tracks = np.zeros((2, 2, 3, 2))
    gt_occ = np.ones((2, 2, 3), bool)              # everything occluded
    pred_occ = np.ones((2, 2, 3), bool)
    pred_occ[1, 0, 1] = False                      # video 1 predicts one false positive
    m = M.tapvid_metrics(q, gt_occ, tracks, pred_occ, tracks, "first")
    assert np.isnan(m["pts_within_4"]).all()       # 0 / 0, as in tapnet
    assert np.isnan(m["jaccard_4"][0])             # 0 / (0 + 0)
    assert m["jaccard_4"][1] == 0.0                # 0 / (0 + 1)
    assert m["occlusion_accuracy"] == pytest.approx([1.0, 0.75])


def test_tapvid_rejects_bad_input():
    q, go, gt, po, pr = _two_points()
    with pytest.raises(ValueError, match="query_mode"):
        M.tapvid_metrics(q, go, gt, po, pr, "all")
    with pytest.raises(ValueError, match="tracks"):
        M.tapvid_metrics(q, go, gt[..., :1], po, pr, "first")


# ------------------------------------------------------------------------------ depth

def test_depth_metrics_by_hand():
    pred = np.array([[[1.0, 2.0, 5.0, 3.0]]])
    gt = np.array([[[1.0, 4.0, 40.0, 0.0]]])        # backdrop (40 m) and 0 are not valid
    m = M.depth_metrics(pred, gt)
    ln2 = math.log(2)
    want = {
        "d1": 0.5, "d2": 0.5, "d3": 0.5, "abs_rel": 0.25, "sq_rel": 0.5, "rmse": math.sqrt(2),
        "rmse_log": ln2 / math.sqrt(2), "log10": math.log10(2) / 2, "silog": ln2 * math.sqrt(3 / 8),
    }
    assert set(m) == set(want)
    for k, v in want.items():
        assert m[k].shape == (1,)
        assert m[k][0] == pytest.approx(v), k


def test_depth_metrics_thresholds_and_pooling():
    gt = np.full((2, 1, 3), 2.0)
    pred = np.array([[[2.0, 2.4, 3.0]], [[2.0, 2.0, 2.0]]])    # ratios 1, 1.2, 1.5
    m = M.depth_metrics(pred, gt)
    assert m["d1"] == pytest.approx([2 / 3, 1.0])
    assert m["d2"] == pytest.approx([1.0, 1.0])
    pooled = M.depth_metrics(pred, gt, per_image=False)
    assert pooled["d1"] == pytest.approx(5 / 6)
    assert pooled["abs_rel"] == pytest.approx((0.2 + 0.5) / 6)
    perfect = M.depth_metrics(gt, gt)
    assert perfect["abs_rel"] == pytest.approx([0, 0]) and perfect["d1"] == pytest.approx([1, 1])
    assert perfect["silog"] == pytest.approx([0, 0], abs=1e-7)


def test_depth_metrics_explicit_valid_and_empty_image():
    gt = np.array([[[1.0, 2.0]], [[50.0, 60.0]]])
    pred = np.array([[[2.0, 2.0]], [[1.0, 1.0]]])
    m = M.depth_metrics(pred, gt)
    assert m["abs_rel"][0] == pytest.approx(0.5) and np.isnan(m["abs_rel"][1])
    valid = np.array([[[True, False]], [[False, False]]])
    m = M.depth_metrics(pred, gt, valid)
    assert m["abs_rel"][0] == pytest.approx(1.0)


def test_depth_metrics_subset_equals_the_full_set():
    rng = np.random.default_rng(3)
    gt = rng.uniform(0.0, 12.0, (3, 2, 5, 6))
    pred = rng.uniform(0.2, 9.0, gt.shape)
    full = M.depth_metrics(pred, gt)
    for keys in (("abs_rel",), ("silog", "d2"), ("log10",)):
        part = M.depth_metrics(pred, gt, keys=keys)
        assert list(part) == list(keys)
        for k in keys:
            np.testing.assert_array_equal(part[k], full[k])
    with pytest.raises(ValueError, match="unknown depth metric"):
        M.depth_metrics(pred, gt, keys=("absrel",))


def test_scale_shift_alignment_recovers_exactly():
    rng = np.random.default_rng(1)
    gt = rng.uniform(0.5, 9.0, (2, 3, 8, 8))
    gt[..., 0, 0] = 40.0                          # invalid pixel, must not bias the fit
    scale, shift = np.array([[2.5], [0.5]]) * np.ones((2, 3)), np.full((2, 3), 0.3)
    scale[1, 2] = 7.0
    disparity = (1.0 / gt - shift[..., None, None]) / scale[..., None, None]
    depth, s, b = M.align_scale_shift_disparity(disparity, gt)
    assert s == pytest.approx(scale) and b == pytest.approx(shift)
    valid = M.depth_valid(gt)
    assert np.allclose(depth[valid], gt[valid])
    assert M.depth_metrics(depth, gt)["abs_rel"] == pytest.approx(np.zeros((2, 3)), abs=1e-9)
    assert depth.max() <= M.DEPTH_MAX + 1e-9       # clamped disparity: finite everywhere


# ------------------------------------------------------------------------------ poses

def _rz(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def _pose(r=np.eye(3), t=(0, 0, 0)):
    p = np.eye(4)
    p[:3, :3] = r
    p[:3, 3] = t
    return p


def test_pose_errors_identity_is_zero():
    ref = np.stack([_pose(_rz(10 * i), (i, 0.5 * i, 0)) for i in range(5)])
    e = M.pose_errors(ref, ref.copy())
    assert set(e) == {"ape_translation_rmse", "ape_translation_mean", "ape_rotation_deg_rmse",
                      "ape_rotation_deg_mean", "rpe_translation_rmse", "rpe_rotation_deg_rmse",
                      "ate_translation_rmse"}
    for k, v in e.items():
        assert v == pytest.approx(0.0, abs=1e-6), k


def test_pose_errors_known_rotation_and_offset():
    ref = np.stack([_pose() for _ in range(4)])
    est = np.stack([_pose(_rz(90), (1, 2, 2)) for _ in range(4)])
    e = M.pose_errors(ref, est)
    assert e["ape_rotation_deg_rmse"] == pytest.approx(90) and e["ape_rotation_deg_mean"] == pytest.approx(90)
    assert e["ape_translation_rmse"] == pytest.approx(3) and e["ape_translation_mean"] == pytest.approx(3)
    assert e["rpe_rotation_deg_rmse"] == pytest.approx(0, abs=1e-6)
    assert e["rpe_translation_rmse"] == pytest.approx(0, abs=1e-9)
    assert e["ate_translation_rmse"] == pytest.approx(0, abs=1e-9)   # a constant offset aligns away
    spin = np.stack([_pose(_rz(90 * i)) for i in range(4)])
    assert M.pose_errors(ref, spin)["rpe_rotation_deg_rmse"] == pytest.approx(90)


def test_pose_errors_drift_by_hand():
    ref = np.stack([_pose(t=(x, 0, 0)) for x in (0, 1, 2)])
    est = np.stack([_pose(t=(x, 0, 0)) for x in (0, 1, 3)])
    e = M.pose_errors(ref, est)
    assert e["ape_translation_rmse"] == pytest.approx(math.sqrt(1 / 3))
    assert e["ape_translation_mean"] == pytest.approx(1 / 3)
    assert e["rpe_translation_rmse"] == pytest.approx(math.sqrt(1 / 2))
    assert e["ate_translation_rmse"] == pytest.approx(math.sqrt(2 / 9))


def test_umeyama_recovers_rigid_and_similarity():
    rng = np.random.default_rng(2)
    src = rng.normal(size=(20, 3))
    r = _rz(33) @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])
    t = np.array([0.3, -2.0, 1.0])
    r_fit, t_fit, c = M.umeyama_alignment(src, src @ r.T + t)
    assert np.allclose(r_fit, r) and np.allclose(t_fit, t) and c == 1.0
    r_fit, t_fit, c = M.umeyama_alignment(src, 2.5 * src @ r.T + t, with_scale=True)
    assert np.allclose(r_fit, r) and np.allclose(t_fit, t) and c == pytest.approx(2.5)


def test_pose12_from_cam_to_world():
    c = np.stack([_pose(t=(1, 0, 0)), _pose(t=(5, 5, 5)), _pose(t=(1, 0, 0)) @ _pose(_rz(90))])
    p = M.pose12_from_cam_to_world(c[None])
    assert p.shape == (1, 12)
    assert np.allclose(p[0, :9], _rz(90).reshape(-1)) and np.allclose(p[0, 9:], 0)
    c = np.stack([_pose(_rz(90)), _pose(_rz(90)) @ _pose(t=(1, 0, 0))])
    assert np.allclose(M.pose12_from_cam_to_world(c), np.r_[np.eye(3).reshape(-1), 1, 0, 0])


def test_relative_pose_errors_by_hand():
    gt = np.r_[np.eye(3).reshape(-1), 0, 0, 0]
    pred = np.r_[(2.0 * _rz(90)).reshape(-1), 1, 2, 2]      # scaled rotation: projected first
    e = M.relative_pose_errors(pred[None], gt[None])
    assert e["rotation_deg"] == pytest.approx([90])
    assert e["translation"] == pytest.approx([3])
    assert e["epe"] == pytest.approx([np.linalg.norm(pred - gt)])
    assert np.allclose(M.project_to_so3(2.0 * _rz(90)), _rz(90))
    reflection = np.diag([1.0, 1.0, -1.0])                  # projection must land in SO(3)
    assert np.linalg.det(M.project_to_so3(reflection)) == pytest.approx(1.0)
    same = M.relative_pose_errors(gt, gt)
    assert same["rotation_deg"] == pytest.approx(0, abs=1e-5) and same["epe"] == 0


# ------------------------------------------------------------------------------ classes and boxes

def test_top1():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([1, 0, 0, 0])
    assert M.top1(logits, labels) == pytest.approx(0.75)
    assert M.top1(np.array([1, 1, 0, 1]), labels) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.top1(np.zeros((3, 2)), labels)


def test_box_iou_by_hand_and_degenerate_boxes():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 2, 2], [0, 0, 4, 2]], float)
    b = np.array([[1, 1, 3, 3], [2, 2, 3, 3], [1, 0, 2, 1], [1, 1, 1, 1], [0, 0, 2, 2], [1, 0, 2, 2]], float)
    iou = M.box_iou(a, b)
    assert iou == pytest.approx([1 / 7, 0, 0, 0, 1, 0.25])      # overlap, apart, touching, empty, same, inside
    assert not np.isnan(iou).any()
    valid = np.array([True, False, False, True, True, True])
    assert M.mean_box_iou(a, b, valid) == pytest.approx((1 / 7 + 0 + 1 + 0.25) / 4)
    assert np.isnan(M.mean_box_iou(a, b, np.zeros(6, bool)))
