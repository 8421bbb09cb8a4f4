"""The dataset protocol that training and feature dumps consume.

A *source* is anything with `__len__`, `load(i) -> dict of numpy arrays` and `label_names`
(task -> tuple of class names, possibly empty): `walt.data.store.WorldStore` and every reader in
`walt.data.readers`. `ClipDataset` turns a source into a `torch.utils.data.Dataset` whose items
are dicts of tensors:

    video        float32 (T, 3, H, W), values in [-1, 1]          (always)
    labels       dict task -> int64 scalar                        (when the source has labels)
    depth        float32 (T, H, W) metres (z-depth)               \
    mask         int64 (T, H, W), 0 = scene, k+1 = object k        |
    intrinsics   float32 (T, 3, 3)                                 |
    cam_to_world float32 (T, 4, 4), OpenCV camera axes             |  when the source
    boxes        float32 (T, O, 4) (x0, y0, x1, y1) pixels         |  has them
    box_valid    bool (T, O)                                       |
    query        float32 (N, 3) (t, y, x)                          |
    tracks       float32 (N, T, 2) (x, y) pixels                   |
    visible      bool (N, T)                                      /
    ... and any other array the source provides (object poses, track depth, ...)

Pixel coordinates are continuous, origin at the top-left image corner, pixel centres at +0.5.
Clips are channels-first (T, 3, H, W) everywhere in walt. `FrameDataset` is the image-mode view:
items are single frames as 1-frame clips (`video`, 1 x 3 x H x W) indexed by (clip, frame), so a
shuffled loader draws frames independently from the same videos. `build_dataset` turns a run's
DataConfig into a clip dataset; `walt.data.modes` says how each mode encodes a clip.
"""
from __future__ import annotations

import importlib

import numpy as np
import torch

from walt.data.transforms import normalize


class ClipDataset(torch.utils.data.Dataset):
    """A source's clips as dicts of tensors. `keys` limits what is read for sources whose `load`
    takes them (a world store): training reads only "video", not depth, tracks and masks."""

    def __init__(self, source, transform=None, keys=None):
        self.source = source
        self.transform = transform
        self.keys = keys

    @property
    def label_names(self) -> dict[str, tuple]:
        return dict(getattr(self.source, "label_names", {}) or {})

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        raw = self.source.load(index) if self.keys is None else self.source.load(index, keys=self.keys)
        sample = {}
        for key, value in raw.items():
            if key == "labels":
                continue
            value = np.ascontiguousarray(value)
            if not value.flags.writeable:
                value = value.copy()  # decoded images can be read-only views, which torch warns about
            t = torch.from_numpy(value)
            if key == "video":
                t = normalize(t)
            elif key == "mask":
                t = t.long()
            sample[key] = t
        if "labels" in raw:
            labels = raw["labels"]
            if not isinstance(labels, dict):
                labels = dict(zip(self.label_names, np.asarray(labels).tolist()))
            sample["labels"] = {k: torch.tensor(int(v)) for k, v in labels.items()}
        if self.transform is not None:
            sample = self.transform(sample)
        return sample


class FrameDataset(torch.utils.data.Dataset):
    """Frames of a clip dataset as independent 1-frame clips: I-WALT's training examples and the
    image view of a clip. Index j is frame j % T of clip j // T, so a shuffled order draws frames
    independently from the same videos V-WALT trains on.

    Item j = {'video': (1, 3, H, W), 'clip', 'frame', and of a dict item its 'labels' and the
    frame's 'depth', 'mask', 'intrinsics', 'cam_to_world', 'boxes', 'box_valid' when present}.
    """

    _PER_FRAME = ("depth", "mask", "intrinsics", "cam_to_world", "boxes", "box_valid")

    def __init__(self, clips, frames_per_clip: int | None = None):
        self.clips = clips
        self.frames = frames_per_clip or int(clip_of(clips[0]).shape[0])

    def __len__(self) -> int:
        return len(self.clips) * self.frames

    def __getitem__(self, index: int) -> dict:
        c, f = divmod(index, self.frames)
        item = self.clips[c]
        video = clip_of(item)
        f = min(f, video.shape[0] - 1)
        frame = {"video": video[f : f + 1], "clip": torch.tensor(c), "frame": torch.tensor(f)}
        if isinstance(item, dict):
            frame.update({key: item[key][f] for key in self._PER_FRAME if key in item})
            if "labels" in item:
                frame["labels"] = item["labels"]
        return frame


def clip_of(item):
    """The (T, 3, H, W) clip of a dataset item: a dict with "video", a tensor, or a tuple led by one
    (torch's TensorDataset)."""
    video = item["video"] if isinstance(item, dict) else item[0] if isinstance(item, (tuple, list)) else item
    if not torch.is_tensor(video) or video.dim() != 4 or video.shape[1] != 3:
        shape = tuple(video.shape) if torch.is_tensor(video) else type(video).__name__
        raise ValueError(f"a dataset item must be a clip (T, 3, H, W) or a dict with 'video' of that shape, got {shape}")
    return video


class TensorClips(torch.utils.data.Dataset):
    """Clips stored as one (N, T, 3, H, W) tensor under the key "video" (.safetensors or .pt)."""

    def __init__(self, path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            self.videos = load_file(path)["video"]
        else:
            obj = torch.load(path, weights_only=True)
            self.videos = obj["video"] if isinstance(obj, dict) else obj
        if self.videos.dim() != 5 or self.videos.shape[2] != 3:
            raise ValueError(f"{path}: 'video' must be (N, T, 3, H, W), got shape {tuple(self.videos.shape)}")

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        return {"video": self.videos[i].float()}


def build_dataset(cfg, split: str = "train"):
    """The clip dataset named by a DataConfig: the synthetic moving shapes, a `walt-data` world store
    (`data.path`; `split` unless `data.kwargs` names one), a tensor file of clips, or any
    map-style dataset through `data.factory` ("module:callable")."""
    if cfg.kind == "moving_shapes":
        from walt.data.synthetic import MovingShapes

        return MovingShapes(cfg.num_clips, cfg.frames, cfg.size, **cfg.kwargs)
    if cfg.kind == "tensor":
        return TensorClips(cfg.path)
    if cfg.kind == "world":
        from walt.data.store import WorldStore

        return ClipDataset(WorldStore(cfg.path, **{"split": split, **cfg.kwargs}), keys=("video",))
    if cfg.kind == "factory":
        module, _, name = cfg.factory.partition(":")
        if not module or not name:
            raise ValueError(f"data.factory must be 'module:callable', got {cfg.factory!r}")
        return getattr(importlib.import_module(module), name)(**cfg.kwargs)
    raise ValueError(f"data.kind must be 'moving_shapes', 'world', 'tensor' or 'factory', got {cfg.kind!r}")
