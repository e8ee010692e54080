"""CIFAR-10 and CIFAR-100 from the extracted python-pickle archives, through torchvision (MD5s checked)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.transforms import v2

from cpsc_ray.config import DataConfig
from cpsc_ray.data.common import (
    DATASETS,
    DataError,
    DatasetFamily,
    DatasetInfo,
    Splits,
    check_native_size,
    official_splits,
)

# dataset -> (display name, torchvision class, classes, mean, std)
_FAMILY = {
    "cifar10": ("CIFAR-10", CIFAR10, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ("CIFAR-100", CIFAR100, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def info(cfg: DataConfig) -> DatasetInfo:
    label, _, classes, mean, std = _FAMILY[cfg.dataset]
    check_native_size(cfg.image_size, 32, label)
    return DatasetInfo(cfg.dataset, classes, 3, 32, mean, std)


def _root(cfg: DataConfig) -> Path:
    """The parent of the extracted folder; pointing data.root at that folder itself is accepted too."""
    label, cls, *_ = _FAMILY[cfg.dataset]
    folder, archive = cls.base_folder, cls.filename
    if cfg.root is None:
        raise DataError(
            f"data.root: not set; {label} needs the directory holding {folder}/ as extracted from {archive} "
            "(download it on a machine with internet and point data.root at its parent)"
        )
    root = Path(cfg.root).expanduser()
    if root.name == folder and not (root / folder).is_dir():
        root = root.parent
    names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [name for name in names if not (root / folder / name).is_file()]
    if missing:
        raise DataError(
            f"data.root: {cfg.root} has no {label} files (expected {root / folder}/ holding {', '.join(names)} "
            f"as extracted from {archive}; missing: {', '.join(missing)}); "
            "download it on a machine with internet and point data.root at its parent"
        )
    return root


def load(cfg: DataConfig, info: DatasetInfo, *, augment: bool, mean: Sequence[float], std: Sequence[float]) -> Splits:
    label, cls, *_ = _FAMILY[cfg.dataset]
    root = _root(cfg)
    try:
        train = cls(root=root, train=True, download=False)
        test = cls(root=root, train=False, download=False)
    except RuntimeError as err:  # torchvision's MD5 check of the official files
        raise DataError(
            f"data.root: the {label} files in {root / cls.base_folder} fail torchvision's integrity check ({err}); "
            f"re-extract them from a fresh {cls.filename}"
        ) from None
    augmentation = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if augment else []
    return official_splits(info, cfg, train, test, augmentation, mean, std, f"{label} training images")


DATASETS.add("cifar10", DatasetFamily(info, load))
DATASETS.add("cifar100", DatasetFamily(info, load))
