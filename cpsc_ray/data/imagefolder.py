"""A user's dataset as root/train/<class>/* and root/test/<class>/*, resized to data.image_size."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from cpsc_ray.config import DataConfig
from cpsc_ray.data.common import DATASETS, DataError, DatasetFamily, DatasetInfo, Splits, official_splits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT = "train/<class>/<image> and test/<class>/<image> with the same class folders"


def _split_dirs(cfg: DataConfig) -> tuple[Path, Path]:
    if cfg.root is None:
        raise DataError(f"data.root: not set; imagefolder needs a directory holding {LAYOUT}")
    root = Path(cfg.root).expanduser()
    return root / "train", root / "test"


def _classes(cfg: DataConfig, split: Path) -> list[str]:
    try:
        return find_classes(split)[0]
    except FileNotFoundError:
        raise DataError(f"data.root: {cfg.root} has no class folders in {split.name}/; expected {LAYOUT}") from None


def info(cfg: DataConfig) -> DatasetInfo:
    train, test = _split_dirs(cfg)
    if cfg.image_size is None:
        raise DataError("data.image_size: required for imagefolder (the side length images are resized to)")
    train_classes, test_classes = _classes(cfg, train), _classes(cfg, test)
    if train_classes != test_classes:
        differ = sorted(set(train_classes) ^ set(test_classes))
        raise DataError(
            f"data.root: {cfg.root}: train/ and test/ have different class folders "
            f"(in only one of them: {', '.join(differ)}); expected {LAYOUT}"
        )
    return DatasetInfo("imagefolder", len(train_classes), 3, cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)


def _folder(cfg: DataConfig, split: Path) -> ImageFolder:
    try:
        return ImageFolder(split)
    except FileNotFoundError as err:  # a class folder without a readable image
        raise DataError(f"data.root: {cfg.root}: {err}") from None


def load(cfg: DataConfig, info: DatasetInfo, *, augment: bool, mean: Sequence[float], std: Sequence[float]) -> Splits:
    train_dir, test_dir = _split_dirs(cfg)
    train, test = _folder(cfg, train_dir), _folder(cfg, test_dir)
    size = info.image_size
    resize = [v2.Resize(size), v2.CenterCrop(size)]
    augmentation = [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()] if augment else []
    return official_splits(info, cfg, train, test, augmentation, mean, std, "imagefolder training images", resize)


DATASETS.add("imagefolder", DatasetFamily(info, load))
