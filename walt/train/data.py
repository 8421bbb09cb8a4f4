"""The dataset protocol of the trainers and the step-indexed batch order.

A training dataset is any map-style dataset whose items are clips: a dict with "video"
(T, 3, H, W) float32 in [-1, 1], that tensor itself, or a tuple led by it. A procedural-world
store (`walt-data generate`) is `data.kind: world` with `data.path` (and `data.kwargs.split`);
any other dataset plugs in through `data.kind: factory` ("module:callable"); the synthetic
moving shapes and a tensor file of clips need nothing else.

The order of examples is a pure function of (seed, step): a resumed run, and any number of
ranks sharing one global batch, read exactly the examples an uninterrupted single-process run
would.
"""
import importlib

import torch

from walt.train.synthetic import MovingShapes


def build_dataset(cfg):
    """The clip dataset named by a DataConfig."""
    if cfg.kind == "moving_shapes":
        return MovingShapes(cfg.num_clips, cfg.frames, cfg.size, **cfg.kwargs)
    if cfg.kind == "tensor":
        return TensorClips(cfg.path)
    if cfg.kind == "world":  # a procedural-world store written by `walt-data generate`
        from walt.data import ClipDataset, WorldStore

        return ClipDataset(WorldStore(cfg.path, **cfg.kwargs))
    if cfg.kind == "factory":
        module, _, name = cfg.factory.partition(":")
        if not module or not name:
            raise ValueError(f"data.factory must be 'module:callable', got {cfg.factory!r}")
        return getattr(importlib.import_module(module), name)(**cfg.kwargs)
    raise ValueError(f"data.kind must be 'moving_shapes', 'world', 'tensor' or 'factory', got {cfg.kind!r}")


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


def clip_of(item):
    """The (T, 3, H, W) clip of a dataset item: a dict with "video", a tensor, or a tuple led by one
    (torch's TensorDataset)."""
    video = item["video"] if isinstance(item, dict) else item[0] if isinstance(item, (tuple, list)) else item
    if not torch.is_tensor(video) or video.dim() != 4 or video.shape[1] != 3:
        shape = tuple(video.shape) if torch.is_tensor(video) else type(video).__name__
        raise ValueError(f"a dataset item must be a clip (T, 3, H, W) or a dict with 'video' of that shape, got {shape}")
    return video


class FrameDataset(torch.utils.data.Dataset):
    """Single frames of a clip dataset, each a 1-frame clip: I-WALT's training examples.

    Index j is frame j % T of clip j // T, so a shuffled order samples frames independently
    from the same videos V-WALT trains on.
    """

    def __init__(self, clips, frames_per_clip):
        self.clips, self.frames = clips, frames_per_clip

    def __len__(self):
        return len(self.clips) * self.frames

    def __getitem__(self, j):
        video = clip_of(self.clips[j // self.frames])
        return {"video": video[j % self.frames : j % self.frames + 1]}


def collate(items):
    return torch.stack([clip_of(x) for x in items])


class StepBatches(torch.utils.data.Sampler):
    """Yields this rank's share of the global batch of every step from `start` on.

    Global batch s holds positions s*B .. s*B+B-1 of an endless stream of epochs, each a
    permutation drawn from (seed, epoch). Rank r takes the r-th contiguous slice; `keys`
    gives the stream positions (unique per example drawn), which key the diffusion noise.
    """

    def __init__(self, n, global_batch, seed, start=0, rank=0, world=1):
        if global_batch % world:
            raise ValueError(f"train.batch_size {global_batch} must be divisible by the number of processes {world}")
        self.n, self.B, self.seed, self.start, self.rank, self.world = n, global_batch, seed, start, rank, world
        self.local = global_batch // world
        self._perm_epoch, self._perm = None, None

    def keys(self, step):
        first = step * self.B + self.rank * self.local
        return torch.arange(first, first + self.local, dtype=torch.long)

    def _index(self, pos):
        epoch, i = divmod(pos, self.n)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            self._perm_epoch = epoch
        return int(self._perm[i])

    def __iter__(self):
        step = self.start
        while True:
            yield [self._index(int(k)) for k in self.keys(step)]
            step += 1

    def __len__(self):  # endless; DataLoader only needs a number
        return 2**62
