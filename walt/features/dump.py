"""A feature dump end to end: a run and a data source in, a feature file out.

`load_backbone` reads a run (`RUN`, `random:RUN` or `latents:RUN`) into an extraction backbone and
the attributes that identify it; `open_source` reads a data set in any format walt reads and
`PreparedClips` trims and resizes its clips (and every annotation with them) to what the run was
trained on; `dump` runs `walt.features.extract` over the clips and writes with
`walt.features.h5.FeatureWriter`, resuming an interrupted file, one shard per rank under torchrun.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess

import numpy as np
import torch

from walt.features.extract import Backbone
from walt.features.h5 import (
    FeatureFile,
    FeatureFileError,
    FeatureWriter,
    check_same_dump,
    join_shards,
    rank_slice,
    shard_path,
)
from walt.heap import reused_heap

FORMATS = ("world", "tapvid", "videos", "images", "rgbd")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
# Per-clip annotations indexed by frame first, and per-track ones (the track axis first).
_FRAME_FIRST = ("depth", "mask", "intrinsics", "cam_to_world", "boxes", "box_valid", "object_to_world")
_TRACK_FRAME = ("tracks", "visible", "track_depth")
_PER_TRACK = ("query", "tracks", "visible", "track_depth", "track_owner")


def git_sha() -> str:
    """The commit of the walt checkout this runs from, or "unknown"."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        res = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- runs
def parse_run(spec: str) -> tuple[str, str]:
    """'RUN' -> ('walt', RUN); 'random:RUN' and 'latents:RUN' -> the control kinds."""
    for kind in ("random", "latents"):
        if spec.startswith(kind + ":"):
            return kind, spec[len(kind) + 1:]
    return "walt", spec


def trained_video_size(cfg) -> tuple[int, int, int]:
    """(T, H, W) of the clips a diffusion run was trained on: its data config's, the world store's
    when that is still there, else the largest clips the model's latent grid holds."""
    d, ae, m = cfg.data, cfg.autoencoder, cfg.model
    if d.kind == "moving_shapes":
        return d.frames, d.size, d.size
    if d.kind == "world" and d.path and os.path.exists(os.path.join(d.path, "manifest.json")):
        with open(os.path.join(d.path, "manifest.json")) as f:
            w = json.load(f)["config"]
        return w["frames"], w["height"], w["width"]
    T, H, W = m.input_size
    s = ae.spatial_factor * m.patch_size
    return 1 + (T - 1) * ae.temporal_factor, H * s, W * s


def load_backbone(run_spec: str, blocks=(), timesteps=(), seed: int = 0, step: int | None = None,
                  device="cpu", autoencoder: str | None = None) -> tuple[Backbone, dict, tuple]:
    """(Backbone, identifying attributes, trained video size (T, H, W)) of a run spec; raises
    ValueError / FileNotFoundError with one sentence on a wrong run, block or timestep."""
    from walt import runs
    from walt.config import to_dict
    from walt.diffusion.objective import Diffusion

    kind, run_dir = parse_run(run_spec)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} does not exist.")
    try:
        cfg = runs.run_config(run_dir, "diffusion")
    except ValueError as e:
        raise ValueError(f"{e} `walt-probe dump` reads a diffusion run (`walt-train diffusion`); its autoencoder "
                         "is found through the run's config.") from None
    if step is not None and kind != "walt":
        raise ValueError(f"--step selects a snapshot of trained weights; the {kind} control has none.")
    ae_dir = autoencoder or cfg.autoencoder_run
    if not ae_dir or not os.path.isdir(ae_dir):
        raise FileNotFoundError(f"{run_dir} was trained on the autoencoder run {ae_dir!r}, which is not there; "
                                "pass --autoencoder DIR.")
    vae = runs.load_autoencoder(ae_dir, device)
    ae_weights = runs.weights_path(ae_dir, ema=False)
    model, checkpoint = None, ""
    if kind == "walt":
        checkpoint = runs.weights_path(run_dir, ema=True, step=step)
        model, _ = runs.load_transformer(run_dir, device=device, step=step)
    elif kind == "random":
        model, _ = runs.load_transformer(run_dir, device=device, weights=False)
    diffusion = Diffusion(cfg.diffusion)
    backbone = Backbone(kind, cfg.model.mode, vae, model, diffusion.alphas_cumprod, blocks, timesteps, seed, device)
    import walt

    attrs = {
        "walt_version": walt.__version__, "git_sha": git_sha(),
        "config": json.dumps(to_dict(cfg), sort_keys=True), "run": os.path.abspath(run_dir), "kind": kind,
        "checkpoint": os.path.abspath(checkpoint) if checkpoint else "",
        "checkpoint_sha256": runs.sha256(checkpoint) if checkpoint else "",
        "autoencoder": os.path.abspath(ae_weights), "autoencoder_sha256": runs.sha256(ae_weights),
        "step": -1 if step is None else int(step), "mode": cfg.model.mode, "seed": int(seed),
        "noise_backend": "none" if kind == "latents" else "fused",
        "blocks": np.asarray(backbone.blocks, np.int64), "timesteps": np.asarray(backbone.timesteps, np.int64),
    }
    return backbone, attrs, trained_video_size(cfg)


def check_grid(backbone: Backbone, frames: int, height: int, width: int):
    """One sentence when the run's model cannot take clips of this size."""
    if height % backbone.vae.cfg.spatial_factor or width % backbone.vae.cfg.spatial_factor:
        raise ValueError(f"clips of {height}x{width} pixels do not divide into the autoencoder's "
                         f"{backbone.vae.cfg.spatial_factor}x{backbone.vae.cfg.spatial_factor} patches.")
    if backbone.model is None:
        return
    T, h, w = backbone.latent_grid(frames, height, width)
    Tm, Hm, Wm = backbone.model.cfg.input_size
    if h > Hm or w > Wm or (backbone.mode == "video" and T > Tm):
        raise ValueError(f"{frames}x{height}x{width} clips become a {T}x{h}x{w} latent grid, larger than the "
                         f"model's input_size {Tm}x{Hm}x{Wm}.")


# ----------------------------------------------------------------------------- data
def detect_format(path: str) -> str:
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext in (".pkl", ".pickle"):
            return "tapvid"
        if ext == ".csv":
            return "videos"
        raise ValueError(f"cannot tell the format of {path}: expected a TAP-Vid .pkl, a .csv of labelled videos, "
                         "or a folder; pass --format.")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "manifest.json")):
            return "world"
        if os.path.isdir(os.path.join(path, "Images")) and os.path.isdir(os.path.join(path, "CameraPose")):
            return "rgbd"
        for d in sorted(os.listdir(path)):
            sub = os.path.join(path, d)
            if os.path.isdir(sub) and any(f.lower().endswith(_IMAGE_EXTENSIONS) for f in os.listdir(sub)):
                return "images"
        raise ValueError(f"cannot tell the format of the folder {path}: expected a `walt-data` store (manifest.json), "
                         "an RGB-D sequence (Images/, Depth/, CameraPose/) or class folders of images; pass --format.")
    raise FileNotFoundError(f"data {path} does not exist.")


def open_source(path: str, fmt: str | None = None, split: str | None = None, frames: int = 17):
    """(source, format, split) for DATA; `frames` is how many frames readers cut a clip into."""
    from walt.data import readers

    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}.")
    if split is not None and fmt != "world":
        raise ValueError(f"--split selects a split of a `walt-data` store; {fmt} data has none.")
    if fmt == "world":
        from walt.data.store import WorldStore

        split = split or "test"
        try:
            return WorldStore(path, split), fmt, split
        except KeyError as e:
            raise ValueError(e.args[0]) from None
    if fmt == "tapvid":
        source = readers.TapVidPickle(path)
    elif fmt == "videos":
        source = readers.VideoFolder(os.path.dirname(os.path.abspath(path)), path, num_frames=frames)
    elif fmt == "images":
        source = readers.ImageFolder(path)
    else:
        source = readers.RGBDSequence(path, num_frames=frames)
    return source, fmt, ""


def trim(sample: dict, frames: int) -> dict:
    """The first `frames` frames of a clip and of its annotations; point tracks whose query frame
    falls after them are dropped."""
    s = dict(sample)
    s["video"] = s["video"][:frames]
    for key in _FRAME_FIRST:
        if key in s:
            s[key] = s[key][:frames]
    for key in _TRACK_FRAME:
        if key in s:
            s[key] = s[key][:, :frames]
    if "query" in s:
        keep = s["query"][:, 0] < frames
        for key in _PER_TRACK:
            if key in s:
                s[key] = s[key][keep]
    return s


class PreparedClips(torch.utils.data.Dataset):
    """Clips of a source as the run saw them in training: the first T frames (a source of single
    images stays 1-frame clips), resized so the frame covers H x W and centre-cropped, with every
    annotation transformed alike (walt.data.transforms)."""

    def __init__(self, source, video_size, limit: int | None = None):
        from walt.data.dataset import ClipDataset

        self.clips = ClipDataset(source)
        self.T, self.H, self.W = video_size
        self.n = len(self.clips) if limit is None else min(int(limit), len(self.clips))
        first = self.clips[0]["video"].shape[0] if len(self.clips) else 0
        self.frames = 1 if first == 1 else self.T

    @property
    def label_names(self):
        return self.clips.label_names

    @property
    def video_size(self) -> tuple[int, int, int]:
        return self.frames, self.H, self.W

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from walt.data.transforms import CenterCrop, Resize

        s = self.clips[i]
        T0, _, H0, W0 = s["video"].shape
        if T0 < self.frames or (self.frames == 1 and T0 != 1):
            raise ValueError(f"clip {i} has {T0} frames; the run sees {self.T}-frame clips (or single images), "
                             f"and this data's first clip has {self.frames}.")
        s = trim(s, self.frames)
        if (H0, W0) != (self.H, self.W):
            scale = max(self.H / H0, self.W / W0)
            s = Resize((max(self.H, round(H0 * scale)), max(self.W, round(W0 * scale))))(s)
            s = CenterCrop((self.H, self.W))(s)
        return s


def _collate(items):
    return items


# ----------------------------------------------------------------------------- dumping
def _to_float16(x: torch.Tensor, key: str, ids) -> np.ndarray:
    h = x.to(torch.float16)
    if torch.isinf(h).any() and not torch.isinf(x).any():
        raise ValueError(f"features {key} of clips {ids.tolist()} exceed float16's range (max |x| = "
                         f"{x.abs().max().item():.3g}); they cannot be stored.")
    return h.cpu().numpy()


def _stored(key, value):
    """An annotation as the file stores it. Instance masks go back to the world store's uint8 (the
    dataset widens them to int64 for training; eight times the bytes to pipe and compress)."""
    value = value.numpy() if torch.is_tensor(value) else np.asarray(value)
    if key == "mask" and value.dtype != np.uint8:
        if value.size and (value.min() < 0 or value.max() > 255):
            raise ValueError(f"instance mask ids must lie in 0..255 (stored as uint8), got "
                             f"{value.min()}..{value.max()}")
        value = value.astype(np.uint8)
    return value


def _extras(samples, store_video=True):
    """What a batch of samples stores beside its features: {"video", "labels", "targets"}."""
    from walt.data.transforms import denormalize

    video = np.stack([denormalize(s["video"]).numpy() for s in samples]) if store_video else None
    labels = collections.defaultdict(list)
    for s in samples:
        for task, v in s.get("labels", {}).items():
            labels[task].append(int(v))
    labels = {k: v for k, v in labels.items() if len(v) == len(samples)}
    targets = [{k: _stored(k, v) for k, v in s.items() if k not in ("video", "labels")} for s in samples]
    return {"video": video, "labels": labels, "targets": targets}


@reused_heap()
def dump(out: str, backbone: Backbone, clips: PreparedClips, attrs: dict, *, batch_size: int = 8, write: bool = True,
         store_video: bool = True, progress: bool = False, rank: int = 0, world: int = 1, num_workers: int = 0,
         barrier=None) -> str | None:
    """Dump features of `clips` to `out` (this rank's shard under torchrun, joined by rank 0 after
    `barrier()`). Resumes a file a killed dump left. With write=False the features are computed
    and converted but not stored (for measuring). Returns the path written, None when not written."""
    from tqdm import tqdm

    n = len(clips)
    attrs = {**attrs, "video_size": np.asarray(clips.video_size, np.int64), "num_clips": n, "first_clip": 0,
             "store_video": bool(store_video), "torch_threads": torch.get_num_threads()}
    if write and os.path.exists(out):
        with FeatureFile(out, require_complete=False) as ff:
            check_same_dump(out, ff.attrs, attrs)
            if ff.done.all():
                return out  # already complete
            shards = ff.attrs.get("shards")
            if bool(shards) != (world > 1):
                how = f"under torchrun with {len(shards)} processes" if shards else "by one process"
                raise FeatureFileError(f"{out} was started {how}; resume it the same way.")
    lo, hi = rank_slice(n, rank, world)
    path = shard_path(out, rank, world) if world > 1 else out
    frames, H, W = clips.video_size
    check_grid(backbone, frames, H, W)
    writer = None
    if write:
        writer = FeatureWriter(path, {**attrs, "num_clips": hi - lo, "first_clip": lo},
                               feature_shapes=backbone.feature_shapes(frames, H, W),
                               frame_index=backbone.frame_index(frames), label_names=clips.label_names,
                               video_shape=(frames, H, W, 3) if store_video else None)
        todo = writer.todo() + lo
    else:
        todo = np.arange(lo, hi)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(clips, todo.tolist()), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate)
    pending = collections.deque()

    def batches():
        pos = 0
        for samples in loader:
            ids = torch.as_tensor(todo[pos:pos + len(samples)], dtype=torch.long)
            pos += len(samples)
            pending.append(samples)
            yield ids, torch.stack([s["video"] for s in samples])

    from walt.features.extract import extract

    bar = tqdm(total=len(todo), unit="clip", desc=f"walt-probe dump {os.path.basename(out)}",
               disable=not progress or rank != 0)
    try:
        for ids, feats in extract(backbone, batches()):
            samples = pending.popleft()
            feats16 = {k: _to_float16(v, k, ids) for k, v in feats.items()}
            if writer is not None:
                writer.put(ids.numpy() - lo, feats16, **_extras(samples, store_video))
            bar.update(len(ids))
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    if not write:
        return None
    if world > 1:
        if barrier is not None:
            barrier()
        if rank == 0:
            join_shards(out, [shard_path(out, r, world) for r in range(world)])
        if barrier is not None:
            barrier()
    return out


__all__ = ["FORMATS", "PreparedClips", "check_grid", "detect_format", "dump", "git_sha", "load_backbone",
           "open_source", "parse_run", "trained_video_size", "trim"]
