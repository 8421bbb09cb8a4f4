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
items are single frames (`image`, 3 x H x W) indexed by (clip, frame), so a shuffled loader draws
frames independently from the same videos.
"""
from __future__ import annotations

import numpy as np
import torch

from walt.data.transforms import normalize


class ClipDataset(torch.utils.data.Dataset):
    def __init__(self, source, transform=None):
        self.source = source
        self.transform = transform

    @property
    def label_names(self) -> dict[str, tuple]:
        return dict(getattr(self.source, "label_names", {}) or {})

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        raw = self.source.load(index)
        sample = {}
        for key, value in raw.items():
            if key == "labels":
                continue
            t = torch.from_numpy(np.ascontiguousarray(value))
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
    """Frames of a ClipDataset as independent images (I-WALT training, image-mode probes).

    Item (clip c, frame f) = {'image': (3, H, W), 'labels', and 'depth', 'intrinsics',
    'cam_to_world', 'mask' of that frame when present}."""

    _PER_FRAME = ("depth", "mask", "intrinsics", "cam_to_world", "boxes", "box_valid")

    def __init__(self, clips: ClipDataset, frames_per_clip: int | None = None):
        self.clips = clips
        self.frames = frames_per_clip or int(clips[0]["video"].shape[0])

    def __len__(self) -> int:
        return len(self.clips) * self.frames

    def __getitem__(self, index: int) -> dict:
        c, f = divmod(index, self.frames)
        clip = self.clips[c]
        f = min(f, clip["video"].shape[0] - 1)
        item = {"image": clip["video"][f], "clip": torch.tensor(c), "frame": torch.tensor(f)}
        for key in self._PER_FRAME:
            if key in clip:
                item[key] = clip[key][f]
        if "labels" in clip:
            item["labels"] = clip["labels"]
        return item
