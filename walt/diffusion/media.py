"""Writing generated clips: an mp4 (PyAV) with the samples side by side, and a PNG grid."""
import os

import numpy as np
import torch


def to_uint8(videos):
    """(N, T, 3, H, W) in [-1, 1] -> (N, T, H, W, 3) uint8."""
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be (N, T, 3, H, W), got shape {tuple(videos.shape)}")
    x = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2).cpu().numpy()


def write_mp4(path, videos, fps=8):
    """The N samples tiled left to right in one H.264 clip."""
    import av

    frames = np.concatenate(list(to_uint8(videos)), axis=2)  # T, H, N*W, 3
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]  # yuv420p needs even sizes
    tmp = path + ".tmp.mp4"
    with av.open(tmp, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def write_png_grid(path, videos, pad=2):
    """One row per sample, one column per frame."""
    from PIL import Image

    x = to_uint8(videos)
    N, T, H, W, _ = x.shape
    grid = np.full((N * (H + pad) + pad, T * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for n in range(N):
        for t in range(T):
            y0, x0 = pad + n * (H + pad), pad + t * (W + pad)
            grid[y0 : y0 + H, x0 : x0 + W] = x[n, t]
    Image.fromarray(grid).save(path)
