"""The dataset layer on the embedded digits set and on tiny files written in each dataset's real on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image

from cpsc_ray.config import DataConfig
from cpsc_ray.data import DataError, DatasetInfo, dataset_info, load_splits


def stack(dataset) -> tuple[torch.Tensor, list[int]]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), list(labels)


# --- digits -------------------------------------------------------------------------------------------------


def test_digits_splits_partition_the_set_deterministically():
    splits = load_splits(DataConfig(val_size=200, split_seed=3), augment=False)
    train, val, test = splits.train.indices, splits.val.indices, splits.test.indices
    assert (len(train), len(val), len(test)) == (1797 - 360 - 200, 200, 360)
    assert sorted(train + val + test) == list(range(1797))

    same = load_splits(DataConfig(val_size=200, split_seed=3), augment=False)
    assert (same.train.indices, same.val.indices, same.test.indices) == (train, val, test)
    other = load_splits(DataConfig(val_size=200, split_seed=4), augment=False)
    assert other.test.indices != test and other.val.indices != val

    # items follow the indices: val image i is digits image val[i], labels are the digits' labels
    base_images, base_labels = splits.train.base.tensors
    image, label = splits.val[5]
    expected = (base_images[val[5]] - splits.info.mean[0]) / splits.info.std[0]
    assert torch.allclose(image, expected, atol=1e-6) and label == int(base_labels[val[5]])


@pytest.mark.parametrize("size", [16, 32])
def test_digits_shapes_and_normalisation(size):
    cfg = DataConfig(image_size=size)
    info = dataset_info(cfg)
    assert (info.name, info.num_classes, info.channels, info.image_size) == ("digits", 10, 1, size)
    assert 0.2 < info.mean[0] < 0.4 and 0.2 < info.std[0] < 0.4
    images, labels = stack(load_splits(cfg, augment=False).train)
    assert images.shape == (1797 - 360 - 300, 1, size, size) and images.dtype == torch.float32
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05
    assert set(labels) == set(range(10)) and all(type(y) is int for y in labels)


def test_digits_default_size_without_val():
    splits = load_splits(DataConfig(val_size=0), augment=False)
    assert splits.val is None and splits.info.image_size == 16
    assert len(splits.train) + len(splits.test) == 1797


def test_digits_mean_std_override():
    splits = load_splits(DataConfig(), augment=False, mean=[0.5], std=[0.25])
    raw = splits.test.base.tensors[0][splits.test.indices[0]]
    assert torch.allclose(splits.test[0][0], (raw - 0.5) / 0.25)
    with pytest.raises(DataError, match="1 values"):
        load_splits(DataConfig(), augment=False, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])


def test_digits_augmentation_translates_train_only():
    torch.manual_seed(0)
    plain = load_splits(DataConfig(), augment=False)
    augmented = load_splits(DataConfig(), augment=True)
    originals, labels = stack(plain.train)
    shifted, shifted_labels = stack(augmented.train)
    assert shifted.shape == originals.shape and shifted_labels == labels
    assert ((shifted - originals).abs().amax(dim=(1, 2, 3)) > 1e-4).float().mean() > 0.8  # 1/25 crops are identity
    # every augmented image is its original moved by at most 16 // 8 = 2 pixels over a blank background (no flips)
    background = -plain.info.mean[0] / plain.info.std[0]
    padded = torch.nn.functional.pad(originals, (2, 2, 2, 2), value=background)
    matched = torch.zeros(len(originals), dtype=torch.bool)
    for dy in range(5):
        for dx in range(5):
            window = padded[:, :, dy : dy + 16, dx : dx + 16]
            matched |= torch.isclose(window, shifted, atol=1e-5).flatten(1).all(dim=1)
    assert matched.all()
    assert torch.equal(stack(augmented.val)[0], stack(plain.val)[0])
    assert torch.equal(stack(augmented.test)[0], stack(plain.test)[0])


def test_digits_val_size_too_large():
    with pytest.raises(DataError, match=r"data\.val_size.*1437"):
        load_splits(DataConfig(val_size=1437), augment=False)


# --- CIFAR ------------------------------------------------------------------------------------------------


def write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture
def skip_md5(monkeypatch):
    """The fake files cannot match the official MD5s; bypass the check as torchvision's own tests do."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


def write_cifar10(root: Path) -> tuple[np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data, labels = [], []
    for b in range(1, 6):
        images, targets = cifar_images(4, b), [(4 * b + i) % 10 for i in range(4)]
        write_pickle(folder / f"data_batch_{b}", {"batch_label": f"batch {b}", "data": images, "labels": targets})
        data.append(images)
        labels += targets
    write_pickle(folder / "test_batch", {"data": cifar_images(6, 0), "labels": [9, 8, 7, 6, 5, 4]})
    write_pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    return np.concatenate(data), labels


def test_cifar10_items_labels_and_normalisation(tmp_path, skip_md5):
    train_data, train_labels = write_cifar10(tmp_path)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), val_size=5, split_seed=1)
    info = dataset_info(cfg)
    assert info == DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    splits = load_splits(cfg, augment=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 6)
    assert not set(splits.train.indices) & set(splits.val.indices)
    assert sorted(splits.train.indices + splits.val.indices) == list(range(20))

    image, label = splits.val[2]
    index = splits.val.indices[2]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == train_labels[index]
    # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    for c in range(3):
        v = train_data[index, c * 1024 + 5 * 32 + 7]
        assert image[c, 5, 7].item() == pytest.approx((v / 255 - info.mean[c]) / info.std[c], abs=1e-5)
    assert [splits.test[i][1] for i in range(6)] == [9, 8, 7, 6, 5, 4]

    custom = load_splits(cfg, augment=False, mean=[0.5] * 3, std=[0.5] * 3)
    v = train_data[custom.train.indices[0], 0]
    assert custom.train[0][0][0, 0, 0].item() == pytest.approx((v / 255 - 0.5) / 0.5, abs=1e-5)

    torch.manual_seed(0)
    augmented = load_splits(cfg, augment=True)
    assert augmented.train[0][0].shape == (3, 32, 32)
    assert not torch.equal(stack(augmented.train)[0], stack(splits.train)[0])
    assert torch.equal(stack(augmented.val)[0], stack(splits.val)[0])


def test_cifar100_fine_labels(tmp_path, skip_md5):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = cifar_images(8, 1)
    write_pickle(folder / "train", {"data": train, "fine_labels": [0, 99, 42, 7, 1, 2, 3, 4], "coarse_labels": [0] * 8})
    write_pickle(folder / "test", {"data": cifar_images(3, 2), "fine_labels": [5, 50, 95], "coarse_labels": [1] * 3})
    names = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    write_pickle(folder / "meta", names)
    # pointing data.root at the extracted folder itself works too
    cfg = DataConfig(dataset="cifar100", root=str(folder), val_size=2)
    splits = load_splits(cfg, augment=False)
    assert splits.info.num_classes == 100 and splits.info.mean == (0.5071, 0.4865, 0.4409)
    assert [splits.test[i][1] for i in range(3)] == [5, 50, 95]
    assert len(splits.train) == 6 and not set(splits.train.indices) & set(splits.val.indices)
    index = splits.train.indices[-1]
    image, label = splits.train[len(splits.train) - 1]
    assert label == [0, 99, 42, 7, 1, 2, 3, 4][index]
    v = train[index, 2048]  # blue channel, pixel (0, 0)
    assert image[2, 0, 0].item() == pytest.approx((v / 255 - 0.4409) / 0.2762, abs=1e-5)


def test_cifar_keeps_the_md5_check(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match=r"data\.root.*integrity"):
        load_splits(DataConfig(dataset="cifar10", root=str(tmp_path)), augment=False)


@pytest.mark.parametrize("root", [None, "does-not-exist"])
def test_cifar_missing_root(tmp_path, root):
    cfg = DataConfig(dataset="cifar10", root=None if root is None else str(tmp_path / root))
    with pytest.raises(DataError, match=r"data\.root.*cifar-10-batches-py.*cifar-10-python\.tar\.gz"):
        load_splits(cfg, augment=False)


def test_cifar_rejects_other_image_size():
    with pytest.raises(DataError, match=r"data\.image_size.*32"):
        dataset_info(DataConfig(dataset="cifar100", image_size=64))


def test_val_size_larger_than_training_set(tmp_path, skip_md5):
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match=r"data\.val_size.*20"):
        load_splits(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=25), augment=False)


# --- Tiny-ImageNet ------------------------------------------------------------------------------------------

WNIDS = ["n02", "n01", "n03"]  # unsorted on purpose: labels are indices of the sorted wnids
COLOURS = {"n01": (255, 0, 0), "n02": (0, 255, 0), "n03": (0, 0, 255)}


def write_tiny(root: Path) -> Path:
    top = root / "tiny-imagenet-200"
    (top / "val" / "images").mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for wnid in WNIDS:
        images = top / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), COLOURS[wnid]).save(images / f"{wnid}_{i}.JPEG")
    # val images sit in one folder; only the annotations say which class each is
    annotations = [("val_0.JPEG", "n03"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n02"), ("val_3.JPEG", "n03")]
    for name, wnid in annotations[:3]:
        Image.new("RGB", (64, 64), COLOURS[wnid]).save(top / "val" / "images" / name)
    # greyscale, as some official images are
    Image.new("L", (64, 64), 40).save(top / "val" / "images" / annotations[3][0])
    (top / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in annotations))
    return top


def test_tiny_imagenet_labels_from_annotations(tmp_path):
    top = write_tiny(tmp_path)
    cfg = DataConfig(dataset="tiny_imagenet", root=str(tmp_path), val_size=2)
    info = dataset_info(cfg)
    assert (info.num_classes, info.channels, info.image_size) == (3, 3, 64)
    splits = load_splits(cfg, augment=False, mean=[0, 0, 0], std=[1, 1, 1])
    assert [splits.test[i][1] for i in range(4)] == [2, 0, 1, 2]
    # the decoded colour matches the annotated class (JPEG is lossy, so approximately)
    for i, wnid in enumerate(["n03", "n01", "n02"]):
        image = splits.test[i][0]
        assert image.shape == (3, 64, 64)
        assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor(COLOURS[wnid]) / 255, atol=0.02)
    grey = splits.test[3][0]  # a greyscale JPEG becomes 3 equal channels
    assert grey.shape == (3, 64, 64) and torch.allclose(grey[0], grey[2])

    assert len(splits.train) == 7 and len(splits.val) == 2
    assert not set(splits.train.indices) & set(splits.val.indices)
    for i in range(len(splits.train)):
        image, label = splits.train[i]
        assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor(COLOURS[sorted(WNIDS)[label]]) / 255, atol=0.02)

    # data.root may also be the extracted folder itself
    assert len(load_splits(cfg.model_copy(update={"root": str(top)}), augment=True).test) == 4


def test_tiny_imagenet_without_annotations(tmp_path):
    top = write_tiny(tmp_path)
    (top / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match=r"data\.root.*val_annotations\.txt"):
        load_splits(DataConfig(dataset="tiny_imagenet", root=str(tmp_path)), augment=False)


# --- ImageFolder --------------------------------------------------------------------------------------------


def write_folder(root: Path, classes: dict[str, list[str]]) -> None:
    for split, names in classes.items():
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 12), (60 * c, 10 * i, 200)).save(root / split / name / f"{i}.png")


def test_imagefolder_classes_and_resize(tmp_path):
    write_folder(tmp_path, {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, val_size=1)
    info = dataset_info(cfg)
    assert info == DatasetInfo("imagefolder", 2, 3, 8, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    splits = load_splits(cfg, augment=True)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5, 1, 6)
    assert splits.train.base.classes == ["cat", "dog"]
    assert splits.train[0][0].shape == splits.val[0][0].shape == (3, 8, 8)
    image, label = splits.test[4]  # dog/1.png: a solid colour survives resizing
    assert label == 1
    expected = (torch.tensor([60, 10, 200]) / 255 - torch.tensor(info.mean)) / torch.tensor(info.std)
    assert torch.allclose(image[:, 4, 4], expected, atol=1e-2)


def test_imagefolder_mismatched_classes(tmp_path):
    write_folder(tmp_path, {"train": ["cat", "dog"], "test": ["cat", "emu"]})
    with pytest.raises(DataError, match=r"data\.root.*dog, emu"):
        dataset_info(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8))


def test_imagefolder_needs_image_size(tmp_path):
    write_folder(tmp_path, {"train": ["cat"], "test": ["cat"]})
    with pytest.raises(DataError, match=r"data\.image_size"):
        load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path)), augment=False)
