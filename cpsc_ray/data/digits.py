"""scikit-learn's 8x8 handwritten digits, upsampled: the embedded dataset that needs no files."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from torchvision.transforms import v2

from cpsc_ray.config import DataConfig
from cpsc_ray.data.common import (
    DATASETS,
    DatasetFamily,
    DatasetInfo,
    Splits,
    make_splits,
    seeded_permutation,
    to_normalised_tensor,
)

DEFAULT_SIZE = 16
TEST_SIZE = 360  # digits has no official test split; this many images are fixed aside per split_seed


@lru_cache(maxsize=4)
def _pixels(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images as float32 [N, 1, size, size] in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, torch.from_numpy(digits.target).long()


def _size(cfg: DataConfig) -> int:
    return cfg.image_size or DEFAULT_SIZE


def info(cfg: DataConfig) -> DatasetInfo:
    images, _ = _pixels(_size(cfg))
    return DatasetInfo("digits", 10, 1, _size(cfg), (images.mean().item(),), (images.std().item(),))


def load(cfg: DataConfig, info: DatasetInfo, *, augment: bool, mean: Sequence[float], std: Sequence[float]) -> Splits:
    images, labels = _pixels(info.image_size)
    base = TensorDataset(images, labels)
    perm = seeded_permutation(len(base), cfg.split_seed)
    # Translation only: digits are not flip invariant.
    augmentation = [v2.RandomCrop(info.image_size, padding=info.image_size // 8)] if augment else []
    return make_splits(
        info,
        base,
        perm[TEST_SIZE:],
        cfg.val_size,
        base,
        perm[:TEST_SIZE].sort().values.tolist(),
        to_normalised_tensor(augmentation, mean, std),
        to_normalised_tensor([], mean, std),
        f"digits training images (1797 minus the fixed {TEST_SIZE}-image test split)",
    )


DATASETS.add("digits", DatasetFamily(info, load))
