"""Metrics of the study, written from their published definitions (numpy only).

Every function says where its definition comes from. Conventions shared by the study:

- Pixel coordinates are continuous, origin at the top-left image corner (docs/data.md).
- Depth is valid where ``DEPTH_MIN < gt < DEPTH_MAX`` metres (0.001 and 10, as 4DS evaluates);
  the world's backdrop sphere (~40 m) falls outside and is never scored.
- Poses are 4x4 camera-to-world matrices.
"""
from __future__ import annotations

import numpy as np

TAPVID_THRESHOLDS = (1, 2, 4, 8, 16)
DEPTH_MIN, DEPTH_MAX = 1e-3, 10.0

__all__ = [
    "TAPVID_THRESHOLDS", "DEPTH_MIN", "DEPTH_MAX",
    "tapvid_metrics", "depth_valid", "depth_metrics", "align_scale_shift_disparity",
    "umeyama_alignment", "pose_errors", "pose12_from_cam_to_world", "project_to_so3",
    "rotation_angle_deg", "relative_pose_errors", "top1", "box_iou", "mean_box_iou",
]


# --------------------------------------------------------------------------------------------
# Point tracking
# --------------------------------------------------------------------------------------------

def tapvid_metrics(query_points, gt_occluded, gt_tracks, pred_occluded, pred_tracks, query_mode,
                   per_track=False):
    """TAP-Vid metrics per video (Doersch et al., "TAP-Vid", NeurIPS 2022; the definition of
    ``compute_tapvid_metrics`` in google-deepmind/tapnet, ``tapnet/evaluation_datasets.py``).

    Args:
      query_points: (B, N, 3) queries as (t, y, x); t is rounded to the nearest frame.
      gt_occluded, pred_occluded: (B, N, T) bool, True = occluded.
      gt_tracks, pred_tracks: (B, N, T, 2) positions as (x, y) in pixels of a 256x256 frame
        (the thresholds are in those pixels; rescale first).
      query_mode: 'first' scores the frames strictly after the query frame (the prior that a
        point does not exist before its query); 'strided' scores every frame but the query frame.
      per_track: reduce over frames only, giving (B, N) arrays instead of (B,).

    Returns a dict of float64 arrays of shape (B,) (or (B, N)):
      occlusion_accuracy: fraction of scored frames whose predicted occlusion equals the truth.
      pts_within_{d}, d in 1, 2, 4, 8, 16: among scored frames where the point is visible, the
        fraction predicted at distance strictly below d pixels (ignoring predicted occlusion).
      jaccard_{d}: TP / (TP + FP + FN), TP = visible, predicted visible and within d;
        FP = predicted visible but occluded or not within d; TP + FN = visible frames.
      average_pts_within_thresh, average_jaccard: the means over the five thresholds.

    Divisions follow tapnet: a video with no visible scored frame gets NaN for pts_within and
    (unless it predicts some point visible) for jaccard; a benchmark's number is the mean over
    videos (``np.nanmean`` skips such videos, ``np.mean`` propagates NaN as tapnet does).
    """
    q = np.asarray(query_points)
    gt_occ = np.asarray(gt_occluded, dtype=bool)
    pr_occ = np.asarray(pred_occluded, dtype=bool)
    gt = np.asarray(gt_tracks, dtype=np.float64)
    pr = np.asarray(pred_tracks, dtype=np.float64)
    if q.ndim != 3 or q.shape[-1] != 3:
        raise ValueError(f"query_points must be (B, N, 3) as (t, y, x), got {q.shape}")
    if gt_occ.shape != pr_occ.shape or gt_occ.shape != q.shape[:2] + gt_occ.shape[2:] or gt_occ.ndim != 3:
        raise ValueError(f"occlusion arrays must both be (B, N, T) matching query_points {q.shape}, "
                         f"got {gt_occ.shape} and {pr_occ.shape}")
    if gt.shape != gt_occ.shape + (2,) or pr.shape != gt.shape:
        raise ValueError(f"tracks must be (B, N, T, 2) = {gt_occ.shape + (2,)}, got {gt.shape} and {pr.shape}")
    T = gt_occ.shape[-1]
    qt = np.round(q[..., 0]).astype(np.int64)[..., None]           # (B, N, 1)
    frames = np.arange(T)
    if query_mode == "first":
        scored = frames > qt
    elif query_mode == "strided":
        scored = frames != qt
    else:
        raise ValueError(f"query_mode must be 'first' or 'strided', got {query_mode!r}")
    axes = (2,) if per_track else (1, 2)
    count = lambda m: np.sum(m & scored, axis=axes)  # noqa: E731
    vis, pr_vis = ~gt_occ, ~pr_occ
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        out["occlusion_accuracy"] = count(gt_occ == pr_occ) / count(np.ones_like(gt_occ))
        dist2 = np.sum((pr - gt) ** 2, axis=-1)
        n_vis = count(vis)
        pts, jac = [], []
        for d in TAPVID_THRESHOLDS:
            near = dist2 < d * d
            hit = near & vis
            pts.append(count(hit) / n_vis)
            tp = count(hit & pr_vis)
            fp = count(pr_vis & (gt_occ | ~near))
            jac.append(tp / (n_vis + fp))
            out[f"pts_within_{d}"] = pts[-1]
            out[f"jaccard_{d}"] = jac[-1]
        out["average_jaccard"] = np.mean(np.stack(jac, axis=-1), axis=-1)
        out["average_pts_within_thresh"] = np.mean(np.stack(pts, axis=-1), axis=-1)
    return out


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------

DEPTH_KEYS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")


def depth_valid(gt, min_depth=DEPTH_MIN, max_depth=DEPTH_MAX):
    """The study's validity mask: ``min_depth < gt < max_depth`` and finite."""
    gt = np.asarray(gt)
    return np.isfinite(gt) & (gt > min_depth) & (gt < max_depth)


def depth_metrics(pred, gt, valid=None, per_image=True, keys=DEPTH_KEYS):
    """Depth errors as Depth-Anything-V2 defines them (``eval_depth`` in
    DepthAnything/Depth-Anything-V2, ``metric_depth/util/metric.py``), over valid pixels.

    With r = max(gt / pred, pred / gt), e = pred - gt, g = ln pred - ln gt:
    d_k = mean(r < 1.25**k) for k = 1, 2, 3; abs_rel = mean(|e| / gt); sq_rel = mean(e**2 / gt);
    rmse = sqrt(mean(e**2)); rmse_log = sqrt(mean(g**2)); log10 = mean(|log10 pred - log10 gt|);
    silog = sqrt(mean(g**2) - 0.5 * mean(g)**2) (lambda = 0.5, not scaled by 100).

    Args:
      pred, gt: (..., H, W) depth in metres; pred must be positive on valid pixels.
      valid: (..., H, W) bool, or None for ``depth_valid(gt)`` (0.001 < gt < 10 m).
      per_image: True (default, as Depth-Anything-V2 evaluates: one value per image, averaged
        over images afterwards) gives arrays of shape pred.shape[:-2], NaN for an image with no
        valid pixel. A per-clip value for bootstrapping is the mean over a clip's frames. False
        pools every valid pixel of the input into one float per metric.
      keys: the metrics to compute (default all of ``DEPTH_KEYS``): choosing a learning rate by
        one of them need not pay for the other eight.
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape or pred.ndim < 2:
        raise ValueError(f"pred and gt must have the same (..., H, W) shape, got {pred.shape} and {gt.shape}")
    valid = depth_valid(gt) if valid is None else np.asarray(valid, dtype=bool)
    if valid.shape != gt.shape:
        raise ValueError(f"valid must have gt's shape {gt.shape}, got {valid.shape}")
    unknown = [k for k in keys if k not in DEPTH_KEYS]
    if unknown:
        raise ValueError(f"unknown depth metric(s) {unknown}; known: {', '.join(DEPTH_KEYS)}")
    want = set(keys)
    if per_image:
        lead = gt.shape[:-2]
        pred, gt, valid = (a.reshape(lead + (-1,)) for a in (pred, gt, valid))
        axis = -1
    else:
        pred, gt, valid = pred.reshape(-1), gt.reshape(-1), valid.reshape(-1)
        axis = None
    # Invalid pixels get harmless stand-ins (1 m) and weight 0, so the arithmetic stays finite.
    p = np.where(valid, pred, 1.0)
    t = np.where(valid, gt, 1.0)
    w = valid.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.sum(w, axis=axis)
        mean = lambda x: np.sum(x * w, axis=axis) / n  # noqa: E731
        # The shared terms only where a wanted metric uses them.
        ratio = np.maximum(t / p, p / t) if want & {"d1", "d2", "d3"} else None
        e = p - t if want & {"abs_rel", "sq_rel", "rmse"} else None
        g = np.log(p) - np.log(t) if want & {"rmse_log", "silog"} else None
        formulas = {
            "d1": lambda: mean(ratio < 1.25),
            "d2": lambda: mean(ratio < 1.25 ** 2),
            "d3": lambda: mean(ratio < 1.25 ** 3),
            "abs_rel": lambda: mean(np.abs(e) / t),
            "sq_rel": lambda: mean(e ** 2 / t),
            "rmse": lambda: np.sqrt(mean(e ** 2)),
            "rmse_log": lambda: np.sqrt(mean(g ** 2)),
            "log10": lambda: mean(np.abs(np.log10(p) - np.log10(t))),
            "silog": lambda: np.sqrt(mean(g ** 2) - 0.5 * mean(g) ** 2),
        }
        out = {k: formulas[k]() for k in keys}
    if axis is None:
        out = {k: float(v) for k, v in out.items()}
    return out


def align_scale_shift_disparity(pred, gt, valid=None, max_depth=DEPTH_MAX):
    """Affine-invariant alignment in disparity (MiDaS, Ranftl et al., TPAMI 2020, eq. 4; the
    protocol Depth-Anything V1/V2 use for relative depth): per image, the scale s and shift b
    minimising sum over valid pixels of (s * pred + b - 1 / gt)**2, by least squares.

    Args:
      pred: (..., H, W) a disparity-like prediction (anything affine in 1 / depth).
      gt: (..., H, W) metric depth; valid: (..., H, W) bool or None for ``depth_valid(gt)``.
      max_depth: the aligned disparity is clamped to at least 1 / max_depth (MiDaS' depth cap),
        so the returned depth is finite and positive.

    Returns (depth, scale, shift): depth = 1 / max(s * pred + b, 1 / max_depth) with pred's
    shape, scale and shift of shape pred.shape[:-2]. An image with fewer than two distinct
    valid predictions has no unique fit: s = 0 and b = the mean valid disparity.
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    valid = depth_valid(gt) if valid is None else np.asarray(valid, dtype=bool)
    if pred.shape != gt.shape or valid.shape != gt.shape or pred.ndim < 2:
        raise ValueError(f"pred, gt and valid must share one (..., H, W) shape, got "
                         f"{pred.shape}, {gt.shape} and {valid.shape}")
    lead = gt.shape[:-2]
    x = np.where(valid, pred, 0.0).reshape(lead + (-1,))
    w = valid.reshape(lead + (-1,)).astype(np.float64)
    y = np.where(valid, 1.0 / np.where(valid, gt, 1.0), 0.0).reshape(lead + (-1,))
    # Normal equations of min ||[x 1] [s b]^T - y||^2 over the valid pixels.
    a00, a01, a11 = (w * x * x).sum(-1), (w * x).sum(-1), w.sum(-1)
    b0, b1 = (w * x * y).sum(-1), (w * y).sum(-1)
    det = a00 * a11 - a01 * a01
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = det > 1e-12 * np.maximum(a00 * a11, 1e-300)
        s = np.where(ok, (a11 * b0 - a01 * b1) / np.where(ok, det, 1.0), 0.0)
        b = np.where(ok, (a00 * b1 - a01 * b0) / np.where(ok, det, 1.0),
                     np.where(a11 > 0, b1 / np.maximum(a11, 1.0), 0.0))
    disp = s[..., None, None] * pred + b[..., None, None]
    depth = 1.0 / np.maximum(disp, 1.0 / max_depth)
    return depth, s, b


# --------------------------------------------------------------------------------------------
# Camera poses
# --------------------------------------------------------------------------------------------

def project_to_so3(m):
    """The rotation nearest in Frobenius norm to each (..., 3, 3) matrix: U diag(1, 1, det) V^T
    from the SVD m = U S V^T (Umeyama 1991's reflection guard)."""
    m = np.asarray(m, dtype=np.float64)
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    d = np.where(d == 0, 1.0, d)
    u = u.copy()
    u[..., :, 2] *= d[..., None]
    return u @ vt


def rotation_angle_deg(r):
    """Angle of each rotation (..., 3, 3) in degrees, arccos((tr R - 1) / 2), clipped to [-1, 1]
    (the angle of the SO(3) logarithm, as evo's ``so3_log_angle``)."""
    r = np.asarray(r, dtype=np.float64)
    c = (np.trace(r, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def _inv_se3(p):
    r, t = p[..., :3, :3], p[..., :3, 3]
    out = np.zeros_like(p)
    rt = np.swapaxes(r, -1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", rt, t)
    out[..., 3, 3] = 1.0
    return out


def umeyama_alignment(src, dst, with_scale=False):
    """Least-squares similarity (or rigid, without scale) transform taking points ``src`` onto
    ``dst`` (Umeyama, "Least-squares estimation of transformation parameters between two point
    patterns", TPAMI 1991, eqs. 34-42): minimises sum_i ||dst_i - (c R src_i + t)||^2.

    Args: src, dst (n, 3). Returns (R (3, 3), t (3,), c float; c = 1 without scale).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2:
        raise ValueError(f"src and dst must both be (n, d), got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = np.mean(np.sum(xs ** 2, axis=1))
    cov = xd.T @ xs / src.shape[0]
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(src.shape[1])
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        s[-1, -1] = -1.0
    r = u @ s @ vt
    c = float(np.trace(np.diag(d) @ s) / var_s) if with_scale and var_s > 0 else 1.0
    t = mu_d - c * r @ mu_s
    return r, t, c


def pose_errors(ref, est):
    """Trajectory errors of estimated camera-to-world poses as evo defines them
    (MichaelGrupp/evo, ``evo/core/metrics.py`` APE and RPE; Sturm et al., TUM RGB-D, IROS 2012).

    Args: ref, est (N, 4, 4) camera-to-world poses of the same N frames.

    Returns floats:
      ape_translation_rmse / _mean: ||t_est,i - t_ref,i|| over frames (evo APE, translation part).
      ape_rotation_deg_rmse / _mean: angle of E_i = est_i^-1 ref_i (evo APE, rotation angle).
      rpe_translation_rmse, rpe_rotation_deg_rmse: E_i = (ref_i^-1 ref_{i+1})^-1 (est_i^-1
        est_{i+1}) over consecutive pairs (delta = 1 frame); ||t(E_i)|| and the angle of R(E_i).
        NaN for a single pose.
      ate_translation_rmse: APE translation RMSE after aligning est to ref by the rigid SE(3)
        Umeyama fit of the camera positions (no scale; ``evo_ape --align``).
    """
    ref = np.asarray(ref, dtype=np.float64)
    est = np.asarray(est, dtype=np.float64)
    if ref.shape != est.shape or ref.ndim != 3 or ref.shape[1:] != (4, 4):
        raise ValueError(f"ref and est must both be (N, 4, 4) poses, got {ref.shape} and {est.shape}")
    rmse = lambda e: float(np.sqrt(np.mean(np.square(e)))) if e.size else float("nan")  # noqa: E731
    mean = lambda e: float(np.mean(e)) if e.size else float("nan")  # noqa: E731
    ape_t = np.linalg.norm(est[:, :3, 3] - ref[:, :3, 3], axis=-1)
    e_abs = _inv_se3(est) @ ref
    ape_r = rotation_angle_deg(e_abs[:, :3, :3])
    q_rel = _inv_se3(ref[:-1]) @ ref[1:]
    p_rel = _inv_se3(est[:-1]) @ est[1:]
    e_rel = _inv_se3(q_rel) @ p_rel
    rpe_t = np.linalg.norm(e_rel[:, :3, 3], axis=-1)
    rpe_r = rotation_angle_deg(e_rel[:, :3, :3])
    r, t, _ = umeyama_alignment(est[:, :3, 3], ref[:, :3, 3], with_scale=False)
    aligned = est[:, :3, 3] @ r.T + t
    ate = np.linalg.norm(aligned - ref[:, :3, 3], axis=-1)
    return {
        "ape_translation_rmse": rmse(ape_t), "ape_translation_mean": mean(ape_t),
        "ape_rotation_deg_rmse": rmse(ape_r), "ape_rotation_deg_mean": mean(ape_r),
        "rpe_translation_rmse": rmse(rpe_t), "rpe_rotation_deg_rmse": rmse(rpe_r),
        "ate_translation_rmse": rmse(ate),
    }


def pose12_from_cam_to_world(cam_to_world):
    """The 12-D pose target of the camera-pose readout: the last frame's camera relative to the
    first, C_0^-1 C_{T-1} (its pose in the first camera's frame), as R row-major (9) then t (3).

    cam_to_world: (..., T, 4, 4). Returns (..., 12) float64.
    """
    c = np.asarray(cam_to_world, dtype=np.float64)
    rel = _inv_se3(c[..., 0, :, :]) @ c[..., -1, :, :]
    lead = rel.shape[:-2]
    return np.concatenate([rel[..., :3, :3].reshape(lead + (9,)), rel[..., :3, 3]], axis=-1)


def relative_pose_errors(pred12, gt12):
    """Errors of a 12-D relative pose (R row-major, then t) against the truth, per sample.

    Args: pred12, gt12 (..., 12).

    Returns arrays of shape (...):
      rotation_deg: geodesic angle between R_gt and the predicted R projected to SO(3) by SVD
        (``project_to_so3``), arccos((tr(R_gt^T R) - 1) / 2) in degrees.
      translation: ||t_pred - t_gt||, in the units of the poses (metres for the world).
      epe: end-point error of the raw 12-D vector, ||pred12 - gt12|| (Euclidean, no projection).
        This is our reading of the pose "end-point error" 4DS reports for its 12-D pose readout
        (Carreira et al., "Scaling 4D Representations", 2024): the L2 distance between predicted
        and true pose vectors, averaged over clips. Gen4U (Google DeepMind), which reuses the 4DS
        setup, describes it as one end-point error over the 12-D vector "which considers the
        rotation and translation components jointly"; the exact 4DS evaluation code is not public
        in the sources we could read, so treat the match as documented intent, not verified.
    """
    p = np.asarray(pred12, dtype=np.float64)
    g = np.asarray(gt12, dtype=np.float64)
    if p.shape != g.shape or p.shape[-1] != 12:
        raise ValueError(f"pred12 and gt12 must both be (..., 12), got {p.shape} and {g.shape}")
    lead = p.shape[:-1]
    rp = project_to_so3(p[..., :9].reshape(lead + (3, 3)))
    rg = g[..., :9].reshape(lead + (3, 3))
    rot = rotation_angle_deg(np.swapaxes(rg, -1, -2) @ rp)
    return {
        "rotation_deg": rot,
        "translation": np.linalg.norm(p[..., 9:] - g[..., 9:], axis=-1),
        "epe": np.linalg.norm(p - g, axis=-1),
    }


# --------------------------------------------------------------------------------------------
# Classification and boxes
# --------------------------------------------------------------------------------------------

def top1(logits_or_pred, labels):
    """Micro-averaged top-1 accuracy: the fraction of samples whose prediction equals the label.

    logits_or_pred: (N, classes) scores (argmax taken) or (N,) predicted classes; labels (N,).
    """
    x = np.asarray(logits_or_pred)
    y = np.asarray(labels)
    pred = x.argmax(-1) if x.ndim == y.ndim + 1 else x
    if pred.shape != y.shape:
        raise ValueError(f"predictions {x.shape} do not match labels {y.shape}")
    return float(np.mean(pred == y)) if y.size else float("nan")


def box_iou(a, b):
    """Intersection over union of boxes (x0, y0, x1, y1), elementwise over (..., 4).

    Extents are max(x1 - x0, 0); an empty union (two zero-size boxes) or no overlap gives 0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(f"boxes must be (..., 4) as (x0, y0, x1, y1), got {a.shape} and {b.shape}")
    area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)  # noqa: E731
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = area(a) + area(b) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def mean_box_iou(pred, gt, valid=None):
    """Mean IoU over the valid boxes (all when valid is None); NaN when none is valid.

    pred, gt (..., 4); valid (...) bool.
    """
    iou = box_iou(pred, gt)
    valid = np.ones(iou.shape, bool) if valid is None else np.broadcast_to(np.asarray(valid, bool), iou.shape)
    return float(iou[valid].mean()) if valid.any() else float("nan")
