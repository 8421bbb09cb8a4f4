"""DDP bring-up when started under torchrun (RANK set); a single process otherwise (nanoGPT's rule)."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self):
        return self.world > 1 or dist.is_initialized()

    @property
    def main(self):
        return self.rank == 0


def setup(device="auto"):
    """Initialise the process group if torchrun started us; pick the device (NCCL on GPU, gloo on CPU)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, world, local, dev)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier():
    if dist.is_initialized():
        dist.barrier()
