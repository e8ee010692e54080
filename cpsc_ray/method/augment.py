"""Views of synthetic images that the generator's objective is taken over."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Each image moved by its own whole-pixel offset of up to ``max_shift`` along each axis, the uncovered border
    zero (the teacher's input mean): a crop of the zero-padded image, as Fast-Datafree's and CMI's
    ``RandomCrop(padding)`` of their synthetic images. Differentiable with respect to ``images``."""
    n, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n, 1), device=images.device, generator=generator)
    rows = offsets[0] + torch.arange(height, device=images.device)
    cols = offsets[1] + torch.arange(width, device=images.device)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
