"""Contact sheet: a PNG that shows a few clips' frames, depth, masks, boxes and point tracks, so a
person can see at a glance whether the data look right."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# A perceptually ordered colour ramp (dark purple -> blue -> green -> yellow) for depth.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8; near is yellow, far is purple; inverse depth spreads the
    foreground over the ramp."""
    inv = 1.0 / np.maximum(depth, 1e-6)
    lo, hi = np.percentile(inv, 1), np.percentile(inv, 99.5)
    x = np.clip((inv - lo) / max(hi - lo, 1e-9), 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(x.astype(int), len(_RAMP) - 2)
    f = (x - i)[..., None]
    return (_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def _track_colors(n):
    hues = np.linspace(0, 1, n, endpoint=False)
    return [tuple(int(255 * c) for c in _hsv(h)) for h in hues]


def _hsv(h):
    k = (np.array([5, 3, 1]) + h * 6) % 6
    return 1 - np.clip(np.minimum(k, 4 - k), 0, 1)


def clip_rows(clip: dict, title: str, columns: int = 5, scale: int = 3, max_tracks: int = 16):
    """Two image rows for one clip: RGB with boxes and track trails, then depth with the mask outline,
    at `columns` frames evenly spaced from the first to the last."""
    T, H, W, _ = clip["video"].shape
    frames = sorted(set(np.linspace(0, T - 1, columns).round().astype(int).tolist()))
    tw, th = W * scale, H * scale
    rgb_row = Image.new("RGB", (tw * len(frames), th + 14), (255, 255, 255))
    dep_row = Image.new("RGB", (tw * len(frames), th), (255, 255, 255))
    draw_t = ImageDraw.Draw(rgb_row)
    draw_t.text((2, 1), title, fill=(0, 0, 0))
    tracks, visible = clip.get("tracks"), clip.get("visible")
    colors = _track_colors(max_tracks)
    for c, f in enumerate(frames):
        im = Image.fromarray(clip["video"][f]).resize((tw, th), Image.NEAREST)
        d = ImageDraw.Draw(im)
        if "boxes" in clip:
            for k in np.nonzero(clip["box_valid"][f])[0]:
                x0, y0, x1, y1 = (clip["boxes"][f, k] * scale).tolist()
                d.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 255, 0) if k == 0 else (0, 255, 255))
        if tracks is not None:
            shown = np.linspace(0, len(tracks) - 1, min(max_tracks, len(tracks))).astype(int)
            for n, idx in enumerate(shown):  # spread over the tracks: objects and background
                pts = [(float(x) * scale, float(y) * scale) for x, y in tracks[idx, : f + 1]]
                if len(pts) > 1:
                    d.line(pts, fill=colors[n], width=1)
                x, y = pts[-1]
                if visible[idx, f]:
                    d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colors[n], outline=(0, 0, 0))
                else:  # occluded or out of view: hollow marker
                    d.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colors[n])
        rgb_row.paste(im, (c * tw, 14))
        if "depth" in clip:
            dep = colorize_depth(clip["depth"][f])
            if "mask" in clip:
                m = clip["mask"][f]
                edge = np.zeros_like(m, bool)
                edge[1:] |= m[1:] != m[:-1]
                edge[:, 1:] |= m[:, 1:] != m[:, :-1]
                dep[edge] = 255
            dep_row.paste(Image.fromarray(dep).resize((tw, th), Image.NEAREST), (c * tw, 0))
    return [rgb_row, dep_row]


def contact_sheet(clips: list[dict], titles: list[str], path: str, **kw) -> str:
    rows = [r for clip, title in zip(clips, titles) for r in clip_rows(clip, title, **kw)]
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows) + 4 * len(clips)), (255, 255, 255))
    y = 0
    for i, r in enumerate(rows):
        sheet.paste(r, (0, y))
        y += r.height + (4 if i % 2 else 0)
    sheet.save(path)
    return path
