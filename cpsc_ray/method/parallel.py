"""Data parallelism for the engine: the rank's place in ``torch.distributed`` (one process when it is
not initialised), the rank average of a statistic, the collectives whose gradients flow back to every rank,
and each rank's noise stream, drawn so that a resumed run draws what an unbroken one would."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


def noise_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of a rank's noise stream for one epoch: a resumed run draws what an unbroken one would."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: Tensor) -> Tensor:
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def average(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over the ranks, in place and without autograd (``tensor`` itself on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def average_with_grad(tensor: Tensor) -> Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor) / dist.get_world_size()
