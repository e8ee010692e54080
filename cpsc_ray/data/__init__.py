"""Real datasets for teacher training and evaluation: train / validation hold-out / test splits of normalised tensors.

Every item is ``(float32 image [C, H, W] normalised, int label)``. The validation split is a fixed function of
``data.split_seed``, held out of the training data and transformed like the test split.
"""

from __future__ import annotations

from collections.abc import Sequence

from cpsc_ray.config import DataConfig
from cpsc_ray.data import cifar, digits, imagefolder, tiny_imagenet  # noqa: F401  (they register their datasets)
from cpsc_ray.data.common import DATASETS, DataError, DatasetInfo, Splits

__all__ = ["DATASETS", "DataError", "DatasetInfo", "Splits", "dataset_info", "load_splits"]


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Classes, shape and default normalisation, without decoding images."""
    return DATASETS.get(cfg.dataset, "data.dataset").info(cfg)


def load_splits(
    cfg: DataConfig, *, augment: bool, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Splits:
    """The three splits; `augment` applies training augmentation to `train` only; mean/std override the dataset's."""
    info = dataset_info(cfg)
    mean = info.mean if mean is None else tuple(mean)
    std = info.std if std is None else tuple(std)
    if len(mean) != info.channels or len(std) != info.channels or min(std) <= 0:
        raise DataError(
            f"normalisation for {info.name}: mean and std need {info.channels} values each (std > 0), "
            f"got mean={list(mean)} std={list(std)}"
        )
    return DATASETS.get(cfg.dataset, "data.dataset").load(cfg, info, augment=augment, mean=mean, std=std)
