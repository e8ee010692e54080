"""Types and helpers shared by the dataset families."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from cpsc_ray.config import DataConfig
from cpsc_ray.errors import InputError
from cpsc_ray.registry import Registry


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class DataError(InputError):
    """Dataset files or settings that cannot be used; the message names the config field and the fix."""


@dataclass
class Splits:
    info: DatasetInfo
    train: Dataset
    val: Dataset | None
    test: Dataset


@dataclass(frozen=True)
class DatasetFamily:
    """How a dataset is read: ``info`` (classes, shape, normalisation, without decoding images) and ``load`` (the
    train / validation / test splits)."""

    info: Callable[[DataConfig], DatasetInfo]
    load: Callable[..., Splits]


# data.dataset -> its family; each family's module adds the names it reads.
DATASETS: Registry[DatasetFamily] = Registry("dataset")


class SplitView(Dataset):
    """Items `indices` of `base` (which yields untransformed images) passed through `transform`."""

    def __init__(self, base: Dataset, indices: list[int], transform: Callable[[Any], torch.Tensor]):
        self.base = base
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[i]]
        return self.transform(image), int(label)


def to_normalised_tensor(ops: Sequence[Callable], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """`ops` on the PIL image or [0, 1] tensor, then a plain float32 tensor normalised by mean/std."""
    normalise = v2.Normalize(list(mean), list(std))
    return v2.Compose([*ops, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), normalise, v2.ToPureTensor()])


def seeded_permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def hold_out(pool: torch.Tensor, val_size: int, what: str) -> tuple[list[int], list[int] | None]:
    """Split the shuffled training indices `pool` into (train, val); val is the first `val_size`, None when 0."""
    if val_size >= len(pool):
        raise DataError(
            f"data.val_size: {val_size} must be smaller than the {len(pool)} {what} "
            "(it is held out of them for validation); lower it or set 0 for no validation split"
        )
    train, val = pool[val_size:].sort().values.tolist(), pool[:val_size].sort().values.tolist()
    return train, (val or None)


def make_splits(
    info: DatasetInfo,
    train_base: Dataset,
    pool: torch.Tensor,
    val_size: int,
    test_base: Dataset,
    test_indices: list[int],
    train_transform: Callable,
    eval_transform: Callable,
    what: str,
) -> Splits:
    train, val = hold_out(pool, val_size, what)
    return Splits(
        info=info,
        train=SplitView(train_base, train, train_transform),
        val=None if val is None else SplitView(train_base, val, eval_transform),
        test=SplitView(test_base, test_indices, eval_transform),
    )


def check_native_size(image_size: int | None, native: int, label: str) -> None:
    if image_size not in (None, native):
        raise DataError(
            f"data.image_size: {label} images are {native}x{native}; set {native} or leave it unset (got {image_size})"
        )


def official_splits(
    info: DatasetInfo,
    cfg: Any,
    train: Dataset,
    test: Dataset,
    augmentation: list[Callable],
    mean: Sequence[float],
    std: Sequence[float],
    what: str,
    preprocess: Sequence[Callable] = (),
) -> Splits:
    """Train and test as the dataset ships them; the validation hold-out comes out of train.
    ``preprocess`` (e.g. a resize) applies to every split, ``augmentation`` to train only."""
    return make_splits(
        info,
        train,
        seeded_permutation(len(train), cfg.split_seed),
        cfg.val_size,
        test,
        list(range(len(test))),
        to_normalised_tensor([*preprocess, *augmentation], mean, std),
        to_normalised_tensor(list(preprocess), mean, std),
        what,
    )
