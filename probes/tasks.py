"""The task registry: for each probe task its readout, loss, metrics and target keys.

A data dict (one split) holds ``features`` (N, T', h, w, C), ``frame_index`` (T',) and the
task's targets (numpy arrays or tensors, first axis = clip). ``TASKS[name]`` is a ``Task``:

- ``missing(data)``: None, or one sentence naming the missing key (the task is unavailable).
- ``spec(data)``: what the readout needs to know, inferred from the training split.
- ``build(spec, width, heads, seeds)``: the readout (a group when seeds is a list).
- ``inputs(batch)``: the readout's extra inputs (query points, first box) from a batch.
- ``loss(out, batch, spec)``: per-member training losses (G,) for outputs with a leading G axis.
- ``metrics(out, data, spec)``: numpy outputs of one readout for a whole split -> {name: per-clip
  values (N,)}; a split's score is the mean over clips (``np.nanmean``: clips with nothing to
  score, e.g. no visible point, are skipped), which is also what a bootstrap over clips resamples.
- ``primary`` and ``higher_is_better``: the metric used to choose learning rates.
- ``primary_metrics(out, data, spec)``: optional, the primary metric's per-clip values alone
  (``{primary: (N,)}``) where computing every metric costs much more (depth); ``primary_score``
  uses it to score every member of a grid on val.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from probes import metrics as M
from probes.readouts import AttentiveReadout, BoxTrackReadout, DenseReadout, PointTrackReadout, PoseReadout

log = logging.getLogger(__name__)

__all__ = ["Task", "TASKS", "CLASSIFICATION_TASKS", "get_task", "TAPVID_SIZE"]

CLASSIFICATION_TASKS = ("object", "scene", "texture", "appearance", "motion")
TAPVID_SIZE = 256     # TAP-Vid thresholds are pixels of a 256 x 256 frame


@dataclass(frozen=True)
class Task:
    name: str
    target_keys: tuple
    target_doc: str
    primary: str
    higher_is_better: bool
    spec: Callable
    build: Callable
    inputs: Callable
    loss: Callable
    metrics: Callable
    primary_metrics: Callable | None = None

    def missing(self, data) -> str | None:
        for key in ("features", "frame_index") + self.target_keys:
            if _get(data, key) is None:
                return (f"task '{self.name}' is unavailable: the data has no '{key}' "
                        f"(expected {self.target_doc if key in self.target_keys else 'cached features'})")
        return None

    def primary_score(self, out, data, spec) -> float:
        """The split-level primary metric of one readout's outputs (what chooses a learning rate)."""
        per_clip = (self.primary_metrics or self.metrics)(out, data, spec)
        return self.score({self.primary: per_clip[self.primary]})[self.primary]

    def score(self, per_clip: dict) -> dict:
        """Split-level metrics: the mean over clips of every per-clip value (NaN clips skipped)."""
        out = {}
        for k, v in per_clip.items():
            v = np.asarray(v, dtype=np.float64)
            out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        return out


def _get(data, key):
    """data[key], also reading 'labels/<task>' from a nested {'labels': {task: ...}} dict."""
    if key in data:
        return data[key]
    if "/" in key:
        head, tail = key.split("/", 1)
        inner = data.get(head) if hasattr(data, "get") else None
        if isinstance(inner, dict):
            return inner.get(tail)
    return None


def _np(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _feature_spec(data):
    f = _get(data, "features")
    fi = _np(_get(data, "frame_index"))
    _, Tl, h, w, C = f.shape
    return {"in_dim": int(C), "grid": (int(h), int(w)), "latent_frames": int(Tl),
            "max_frames": int(fi.max()) + 1}


# ----------------------------------------------------------------------------- classification

def _classification(name):
    key = f"labels/{name}"

    def spec(data):
        s = _feature_spec(data)
        names = data.get("label_names") if hasattr(data, "get") else None
        if isinstance(names, dict) and name in names:
            s["num_classes"] = len(names[name])
        else:
            s["num_classes"] = int(_np(_get(data, key)).max()) + 1
            log.warning("no label_names for '%s': assuming %d classes from the largest label",
                        name, s["num_classes"])
        return s

    def build(spec, width=64, heads=4, seeds=None):
        return AttentiveReadout(spec["in_dim"], spec["num_classes"], width=width, heads=heads,
                                grid=spec["grid"], max_frames=spec["max_frames"], seeds=seeds)

    def loss(out, batch, spec):                 # out (G, B, classes)
        y = batch[key].long()
        G = out.shape[0]
        return F.cross_entropy(out.flatten(0, 1), y.repeat(G), reduction="none").view(G, -1).mean(1)

    def metrics(out, data, spec):
        y = _np(_get(data, key))
        return {"top1": (np.asarray(out).argmax(-1) == y).astype(np.float64)}

    return Task(name, (key,), "(N,) int class labels", "top1", True, spec, build,
                lambda batch: (), loss, metrics)


# ----------------------------------------------------------------------------- depth

def _depth_spec(data):
    s = _feature_spec(data)
    depth = _np(_get(data, "depth"))
    _, T, H, W = depth.shape
    valid = M.depth_valid(depth)
    s.update(num_frames=int(T), out_size=(int(H), int(W)), max_frames=max(s["max_frames"], int(T)),
             init_value=float(np.log(depth[valid]).mean()) if valid.any() else 0.0)
    s["patch"] = _depth_patch((int(H), int(W)), s["grid"])
    return s


DEPTH_QUERY_TOKENS = 2    # one depth query per DEPTH_QUERY_TOKENS x DEPTH_QUERY_TOKENS tokens of a frame


def _depth_patch(size, grid):
    """The output patch of one depth query: DEPTH_QUERY_TOKENS x DEPTH_QUERY_TOKENS token cells
    where the grid and the size allow it (8 x 8 pixels of a 32 x 32 frame on an 8 x 8 grid: 16
    queries per frame), else one token cell, else single pixels. The per-query work (attention,
    MLP) dominates a per-frame readout's cost, which grows with frames x queries per frame."""
    (H, W), (h, w) = size, grid
    for k in (DEPTH_QUERY_TOKENS, 1):
        if h % k == 0 and w % k == 0 and H % (h // k) == 0 and W % (w // k) == 0:
            return (H // (h // k), W // (w // k))
    return (1, 1)


def _depth_build(spec, width=64, heads=4, seeds=None):
    return DenseReadout(spec["in_dim"], spec["out_size"], spec["num_frames"], patch=spec["patch"],
                        width=width, heads=heads, grid=spec["grid"], max_frames=spec["max_frames"],
                        init_value=spec["init_value"], seeds=seeds)


class _MaskedL1(torch.autograd.Function):
    """Per member sum(|out - target| * valid): the loss of every pixel of every member, so its
    memory passes are most of a depth step's elementwise work. One pass for the difference, one to
    mask it, one to sum; the backward is sign(masked difference) * grad (|x|'s subgradient 0 at 0,
    as autograd's, and 0 where invalid)."""

    @staticmethod
    def forward(ctx, out, target, valid):             # out (G, ...), target and valid (...)
        d = (out - target).mul_(valid)
        ctx.save_for_backward(d)
        return torch.linalg.vector_norm(d.flatten(1), ord=1, dim=1)

    @staticmethod
    def backward(ctx, grad):                          # grad (G,)
        (d,) = ctx.saved_tensors
        return torch.sign(d).mul_(grad.view((-1,) + (1,) * (d.dim() - 1))), None, None


def _depth_loss(out, batch, spec):                     # out (G, B, T, H, W) log-depth
    """Mean absolute error of log-depth over valid pixels, per member (G,)."""
    gt = batch["depth"].float()
    valid = ((gt > M.DEPTH_MIN) & (gt < M.DEPTH_MAX)).float()
    target = torch.log(gt.clamp(min=M.DEPTH_MIN))
    return _MaskedL1.apply(out, target, valid) / valid.sum().clamp(min=1.0)


def _depth_metrics(out, data, spec, keys=M.DEPTH_KEYS):
    """Per image (Depth-Anything-V2), then the mean over a clip's frames with valid pixels."""
    pred = np.exp(np.asarray(out, dtype=np.float64))
    m = M.depth_metrics(pred, _np(_get(data, "depth")), keys=keys)            # per image (N, T)
    return {k: _nanmean_rows(v) for k, v in m.items()}


def _nanmean_rows(v):
    ok = np.isfinite(v)
    n = ok.sum(1)
    return np.where(n > 0, np.where(ok, v, 0.0).sum(1) / np.maximum(n, 1), np.nan)


# ----------------------------------------------------------------------------- camera pose

def _pose_build(spec, width=64, heads=4, seeds=None):
    return PoseReadout(spec["in_dim"], width=width, heads=heads, grid=spec["grid"],
                       max_frames=spec["max_frames"], seeds=seeds)


def _pose_target(batch):
    c = batch["cam_to_world"].double()
    r0, t0 = c[:, 0, :3, :3], c[:, 0, :3, 3]
    r1, t1 = c[:, -1, :3, :3], c[:, -1, :3, 3]
    r = r0.transpose(1, 2) @ r1
    t = (r0.transpose(1, 2) @ (t1 - t0)[..., None])[..., 0]
    return torch.cat([r.flatten(1), t], 1).float()


def _pose_loss(out, batch, spec):                      # out (G, B, 12)
    return (out - _pose_target(batch)).pow(2).sum(-1).mean(1)


def _pose_metrics(out, data, spec):
    gt = M.pose12_from_cam_to_world(_np(_get(data, "cam_to_world")))
    return M.relative_pose_errors(np.asarray(out, np.float64), gt)


# ----------------------------------------------------------------------------- point tracking

def _point_spec(data):
    s = _feature_spec(data)
    tracks = _get(data, "tracks")
    T = tracks.shape[2]
    size = data.get("image_size") if hasattr(data, "get") else None
    if size is None:
        depth = _get(data, "depth")
        video = _get(data, "video")
        if depth is not None:
            size = tuple(depth.shape[-2:])
        elif video is not None:
            size = tuple(video.shape[2:4])
        else:
            raise ValueError("point tracking needs the video size: give 'image_size' (H, W)")
    s.update(num_frames=int(T), image_size=tuple(int(v) for v in size), max_frames=max(s["max_frames"], int(T)))
    return s


def _point_build(spec, width=64, heads=4, seeds=None):
    return PointTrackReadout(spec["in_dim"], spec["num_frames"], spec["image_size"], width=width, heads=heads,
                             grid=spec["grid"], max_frames=spec["max_frames"], seeds=seeds)


def _point_loss(out, batch, spec):
    """Huber (delta 1/32 of the frame) on visible positions in frame units + BCE on visibility."""
    tracks, vis_logits = out                     # (G, B, N, T, 2), (G, B, N, T)
    gt, vis = batch["tracks"].float(), batch["visible"].float()
    H, W = spec["image_size"]
    s = tracks.new_tensor([1.0 / W, 1.0 / H])
    pos = F.huber_loss(tracks * s, (gt * s).expand_as(tracks), reduction="none", delta=1 / 32).sum(-1)
    pos = (pos * vis).flatten(1).sum(1) / vis.sum().clamp(min=1.0)
    bce = F.binary_cross_entropy_with_logits(vis_logits, vis.expand_as(vis_logits), reduction="none")
    return pos * 32 + bce.flatten(1).mean(1)


def _point_metrics(out, data, spec):
    tracks, vis_logits = out
    H, W = spec["image_size"]
    s = np.array([TAPVID_SIZE / W, TAPVID_SIZE / H])
    q = _np(_get(data, "query")).astype(np.float64)
    q = np.stack([q[..., 0], q[..., 1] * TAPVID_SIZE / H, q[..., 2] * TAPVID_SIZE / W], -1)
    gt_occ = ~_np(_get(data, "visible")).astype(bool)
    # 'strided': the world's queries sit at arbitrary frames, so frames before the query are scored too.
    return M.tapvid_metrics(q, gt_occ, _np(_get(data, "tracks")) * s, np.asarray(vis_logits) < 0,
                            np.asarray(tracks) * s, "strided")


# ----------------------------------------------------------------------------- box tracking

def _box_build(spec, width=64, heads=4, seeds=None):
    return BoxTrackReadout(spec["in_dim"], spec["num_frames"], spec["image_size"], width=width, heads=heads,
                           grid=spec["grid"], max_frames=spec["max_frames"], seeds=seeds)


def _box_scored(box_valid):
    """Frames scored for the main object (slot 0): valid, after the given first frame, in clips
    whose first-frame box is valid."""
    v = box_valid[:, :, 0].clone() if torch.is_tensor(box_valid) else np.array(box_valid[:, :, 0], bool)
    v[:, 0] = False
    v = v & box_valid[:, :1, 0]
    return v


def _box_loss(out, batch, spec):                       # out (G, B, T, 4) pixels
    gt = batch["boxes"][:, :, 0].float()
    scored = _box_scored(batch["box_valid"].bool()).float()
    H, W = spec["image_size"]
    s = out.new_tensor([1.0 / W, 1.0 / H, 1.0 / W, 1.0 / H])
    err = F.smooth_l1_loss(out * s, (gt * s).expand_as(out), reduction="none", beta=1 / 32).sum(-1)
    return (err * scored).flatten(1).sum(1) / scored.sum().clamp(min=1.0) * 32


def _box_metrics(out, data, spec):
    gt = _np(_get(data, "boxes"))[:, :, 0]
    scored = _box_scored(_np(_get(data, "box_valid")).astype(bool))
    iou = M.box_iou(np.asarray(out), gt)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"mean_iou": np.where(scored.any(1), (iou * scored).sum(1) / scored.sum(1), np.nan)}


def _first_box(batch):
    return (batch["boxes"][:, 0, 0].float(),)


# ----------------------------------------------------------------------------- registry

def _make_tasks():
    tasks = {n: _classification(n) for n in CLASSIFICATION_TASKS}
    tasks["depth"] = Task("depth", ("depth",), "(N, T, H, W) depth in metres", "abs_rel", False,
                          _depth_spec, _depth_build, lambda b: (), _depth_loss, _depth_metrics,
                          lambda out, data, spec: _depth_metrics(out, data, spec, keys=("abs_rel",)))
    tasks["camera_pose"] = Task("camera_pose", ("cam_to_world",), "(N, T, 4, 4) camera-to-world poses", "epe",
                                False, _feature_spec_pose, _pose_build, lambda b: (), _pose_loss, _pose_metrics)
    tasks["point_tracking"] = Task(
        "point_tracking", ("query", "tracks", "visible"),
        "query (N, Q, 3) (t, y, x), tracks (N, Q, T, 2) (x, y) pixels, visible (N, Q, T)",
        "average_jaccard", True, _point_spec, _point_build, lambda b: (b["query"].float(),), _point_loss,
        _point_metrics)
    tasks["box_tracking"] = Task(
        "box_tracking", ("boxes", "box_valid"), "boxes (N, T, O, 4) pixels and box_valid (N, T, O)",
        "mean_iou", True, _box_spec_any, _box_build, _first_box, _box_loss, _box_metrics)
    return tasks


def _feature_spec_pose(data):
    s = _feature_spec(data)
    s["max_frames"] = max(s["max_frames"], int(_get(data, "cam_to_world").shape[1]))
    return s


def _box_spec_any(data):
    boxes = _get(data, "boxes")
    view = dict(data) if hasattr(data, "keys") else {}
    view["tracks"] = np.zeros((1, 1, boxes.shape[1], 2))
    return _point_spec(view)


TASKS = _make_tasks()


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
