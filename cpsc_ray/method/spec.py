"""What an engine runs on: the images' shape and normalisation, the labelled sets it evaluates on, the
device, and the error that ends a diverged run."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class DivergenceError(RuntimeError):
    """A loss became NaN or infinite; the run cannot usefully continue."""


@dataclass(frozen=True)
class ImageSpec:
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class EvalSet:
    """Labelled images (already normalised for the teacher) on which the student's top-1 is measured."""

    images: Tensor
    labels: Tensor


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
