"""Tiny-ImageNet-200 in its official layout; the official val split (labelled by val_annotations.txt) is our test."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
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

FOLDER = "tiny-imagenet-200"
MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
LAYOUT = (
    f"{FOLDER}/ as extracted from tiny-imagenet-200.zip, holding wnids.txt, train/<wnid>/images/*.JPEG, "
    "val/images/*.JPEG and val/val_annotations.txt"
)


class ImageFiles(Dataset):
    """(path, label) pairs decoded lazily to RGB PIL images."""

    def __init__(self, samples: list[tuple[Path, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        with Image.open(path) as image:
            return image.convert("RGB"), label


def _layout_error(cfg: DataConfig, problem: str) -> DataError:
    return DataError(f"data.root: {cfg.root}: {problem}; expected data.root to be or contain {LAYOUT}")


def _directory(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise DataError(f"data.root: not set; Tiny-ImageNet needs the directory {LAYOUT}")
    root = Path(cfg.root).expanduser()
    for candidate in (root, root / FOLDER):
        if (candidate / "wnids.txt").is_file():
            return candidate
    raise _layout_error(cfg, "no wnids.txt")


def _wnids(directory: Path) -> list[str]:
    return sorted({line.strip() for line in (directory / "wnids.txt").read_text().splitlines() if line.strip()})


def info(cfg: DataConfig) -> DatasetInfo:
    check_native_size(cfg.image_size, 64, "Tiny-ImageNet")
    return DatasetInfo("tiny_imagenet", len(_wnids(_directory(cfg))), 3, 64, MEAN, STD)


def _train_samples(cfg: DataConfig, directory: Path, label_of: dict[str, int]) -> list[tuple[Path, int]]:
    samples = []
    for wnid, label in label_of.items():
        files = sorted((directory / "train" / wnid / "images").glob("*.JPEG"))
        if not files:
            raise _layout_error(cfg, f"no training images in train/{wnid}/images/")
        samples += [(path, label) for path in files]
    return samples


def _test_samples(cfg: DataConfig, directory: Path, label_of: dict[str, int]) -> list[tuple[Path, int]]:
    annotations = directory / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise _layout_error(cfg, "no val/val_annotations.txt")
    samples = []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            problem = f"val/val_annotations.txt line {number} does not start with a filename and a wnid of wnids.txt"
            raise _layout_error(cfg, problem)
        samples.append((directory / "val" / "images" / fields[0], label_of[fields[1]]))
    missing = [path.name for path, _ in samples if not path.is_file()]
    if missing:
        problem = f"{len(missing)} images listed in val/val_annotations.txt are not in val/images/, e.g. {missing[0]}"
        raise _layout_error(cfg, problem)
    return samples


def load(cfg: DataConfig, info: DatasetInfo, *, augment: bool, mean: Sequence[float], std: Sequence[float]) -> Splits:
    directory = _directory(cfg)
    label_of = {wnid: label for label, wnid in enumerate(_wnids(directory))}
    train = ImageFiles(_train_samples(cfg, directory, label_of))
    test = ImageFiles(_test_samples(cfg, directory, label_of))
    augmentation = [v2.RandomCrop(64, padding=8), v2.RandomHorizontalFlip()] if augment else []
    return official_splits(info, cfg, train, test, augmentation, mean, std, "Tiny-ImageNet training images")


DATASETS.add("tiny_imagenet", DatasetFamily(info, load))
