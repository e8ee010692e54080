"""What an engine runs on: the images' shape and normalisation, and the labelled sets it evaluates on."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


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
