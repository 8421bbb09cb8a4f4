"""The trainers' step-indexed batch order and collation.

A training dataset is any map-style dataset whose items are clips: a dict with "video"
(T, 3, H, W) float32 in [-1, 1], that tensor itself, or a tuple led by it
(`walt.data.dataset.build_dataset` makes one from a run's DataConfig).

The order of examples is a pure function of (seed, step): a resumed run, and any number of
ranks sharing one global batch, read exactly the examples an uninterrupted single-process run
would.
"""
import torch

from walt.data.dataset import clip_of


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
