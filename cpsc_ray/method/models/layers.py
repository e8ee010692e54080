"""Building blocks the model families share."""

from __future__ import annotations

from torch import Tensor


def global_average(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C). A mean, not adaptive_avg_pool2d: that one's CUDA backward, which generator
    steps run through the teacher, has no deterministic kernel (issue 13); the values are the same."""
    return x.mean((2, 3))
