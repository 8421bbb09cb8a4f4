"""Transforms on samples of the dataset protocol (dicts of tensors, see walt.data.dataset).

Every geometric transform is applied consistently to all frames and to every annotation that
lives in pixel space: video, depth, mask, intrinsics, point tracks (and their query points and
visibility), and boxes. Pixel coordinates are continuous with the origin at the image corner
(pixel centres at +0.5), so a resize by s maps x -> s * x exactly and a crop maps x -> x - left.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(video_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3, H, W) in [-1, 1]."""
    return video_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def denormalize(video: torch.Tensor) -> torch.Tensor:
    """float (T, 3, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    return video.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class Compose:
    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, sample: dict) -> dict:
        for t in self.transforms:
            sample = t(sample)
        return sample


class Resize:
    """Resize every frame to (height, width): bilinear with antialiasing for video, nearest for
    depth and mask (so depth never blends foreground with background)."""

    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, s: dict) -> dict:
        s = dict(s)
        H, W = s["video"].shape[-2:]
        h, w = self.size
        sx, sy = w / W, h / H
        s["video"] = F.interpolate(s["video"], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        for key in ("depth", "mask"):
            if key in s:
                x = s[key][:, None].float()
                # nearest with pixel-centre sampling: output centre (j+0.5)/sx maps to input pixel floor(.)
                s[key] = F.interpolate(x, size=(h, w), mode="nearest-exact")[:, 0].to(s[key].dtype)
        if "intrinsics" in s:
            k = s["intrinsics"].clone()
            k[..., 0, :] *= sx
            k[..., 1, :] *= sy
            s["intrinsics"] = k
        if "tracks" in s:
            s["tracks"] = s["tracks"] * s["tracks"].new_tensor([sx, sy])
        if "query" in s:
            s["query"] = s["query"] * s["query"].new_tensor([1.0, sy, sx])
        if "boxes" in s:
            s["boxes"] = s["boxes"] * s["boxes"].new_tensor([sx, sy, sx, sy])
        return s


def crop(s: dict, top: int, left: int, height: int, width: int) -> dict:
    """The same crop of every frame; tracks leaving the crop become invisible, boxes are clipped."""
    H, W = s["video"].shape[-2:]
    if not (0 <= top and 0 <= left and top + height <= H and left + width <= W):
        raise ValueError(f"crop ({top}, {left}, {height}, {width}) does not fit in a {H}x{W} frame.")
    s = dict(s)
    s["video"] = s["video"][..., top:top + height, left:left + width]
    for key in ("depth", "mask"):
        if key in s:
            s[key] = s[key][..., top:top + height, left:left + width]
    if "intrinsics" in s:
        k = s["intrinsics"].clone()
        k[..., 0, 2] -= left
        k[..., 1, 2] -= top
        s["intrinsics"] = k
    if "tracks" in s:
        t = s["tracks"] - s["tracks"].new_tensor([left, top])
        s["tracks"] = t
        if "visible" in s:
            inside = (t[..., 0] >= 0) & (t[..., 0] < width) & (t[..., 1] >= 0) & (t[..., 1] < height)
            s["visible"] = s["visible"] & inside
    if "query" in s:
        s["query"] = s["query"] - s["query"].new_tensor([0.0, top, left])
    if "boxes" in s:
        b = s["boxes"] - s["boxes"].new_tensor([left, top, left, top])
        b = torch.stack([b[..., 0].clamp(0, width), b[..., 1].clamp(0, height),
                         b[..., 2].clamp(0, width), b[..., 3].clamp(0, height)], -1)
        s["boxes"] = b
        if "box_valid" in s:
            s["box_valid"] = s["box_valid"] & (b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1])
    return s


class CenterCrop:
    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, s: dict) -> dict:
        H, W = s["video"].shape[-2:]
        h, w = self.size
        return crop(s, (H - h) // 2, (W - w) // 2, h, w)


class RandomCrop:
    """A crop at a random place, the same for every frame of the clip."""

    def __init__(self, size, generator: torch.Generator | None = None):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.generator = generator

    def __call__(self, s: dict) -> dict:
        H, W = s["video"].shape[-2:]
        h, w = self.size
        top = int(torch.randint(0, H - h + 1, (), generator=self.generator))
        left = int(torch.randint(0, W - w + 1, (), generator=self.generator))
        return crop(s, top, left, h, w)
