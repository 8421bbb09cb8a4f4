"""Moving shapes: a deterministic synthetic video dataset for tests and the CPU demo.

Clip i is a function of i alone: a few coloured squares and discs moving at constant
velocity (bouncing off the borders) over a coloured background, (T, 3, H, W) in [-1, 1].
"""
import torch


class MovingShapes(torch.utils.data.Dataset):
    def __init__(self, num_clips=1024, frames=17, size=32, max_shapes=3, seed=0):
        self.num_clips, self.frames, self.size, self.max_shapes, self.seed = num_clips, frames, size, max_shapes, seed

    def __len__(self):
        return self.num_clips

    def __getitem__(self, i):
        if not 0 <= i < self.num_clips:
            raise IndexError(f"clip index {i} out of range for {self.num_clips} clips")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        T, S = self.frames, self.size
        video = (torch.rand(3, generator=g) * 0.6 - 0.8)[None, :, None, None].repeat(T, 1, S, S)
        yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
        t = torch.arange(T, dtype=torch.float32)[:, None, None]
        for _ in range(int(torch.randint(1, self.max_shapes + 1, (), generator=g))):
            r = S * (0.1 + 0.12 * torch.rand((), generator=g))
            pos = r + (S - 2 * r) * torch.rand(2, generator=g)
            vel = (torch.rand(2, generator=g) * 2 - 1) * S / 12
            color = torch.rand(3, generator=g) * 1.6 - 0.6
            # bounce: reflect the unbounded path into [r, S - r]
            span = S - 2 * r
            path = (pos[:, None] - r + vel[:, None] * t.view(1, T)) % (2 * span)
            path = r + torch.where(path > span, 2 * span - path, path)  # (2, T)
            cy, cx = path[0].view(T, 1, 1), path[1].view(T, 1, 1)
            if torch.rand((), generator=g) < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            else:
                mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
            video = torch.where(mask[:, None], color[None, :, None, None], video)
        return {"video": video.clamp(-1, 1)}
