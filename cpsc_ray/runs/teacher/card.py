"""A teacher's card and files: the JSON sidecar beside its weights (what it was trained on, how well it does),
and where those files live: a path, a URI (fetched once into the cache), or the cache slot that
``teacher.weights=auto`` names."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from cpsc_ray.config import Config
from cpsc_ray.errors import InputError
from cpsc_ray.method.models import ARCH_VERSIONS
from cpsc_ray.storage import Storage

WEIGHTS_NAME = "teacher.safetensors"


@dataclass(frozen=True)
class TeacherCard:
    """The JSON sidecar written beside a teacher's weights."""

    arch: str  # a registry name or a builder's 'module:function'
    dataset: str
    num_classes: int
    input_size: int
    channels: int
    mean: list[float]
    std: list[float]
    test_acc: float | None = None
    val_acc: float | None = None
    epochs: int | None = None
    seed: int | None = None
    arch_version: int | None = None  # the registry arch's version; cards from before versions existed mean 1


def cache_dir() -> Path:
    return Path(os.environ.get("CPSC_RAY_CACHE", Path.home() / ".cache" / "cpsc-ray"))


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def read_card(weights: Path) -> TeacherCard | None:
    """The card beside a local weights file, or None (a teacher trained elsewhere)."""
    card = card_path(weights)
    return TeacherCard(**json.loads(card.read_text())) if card.is_file() else None


def resolve_weights(cfg: Config) -> str:
    """The teacher's weights file (a path or a URI); ``auto`` names the cache slot ``train_teacher`` fills."""
    weights = cfg.teacher.weights
    if weights is None:
        raise InputError(
            "teacher.weights: required; give the trained teacher's weights file, or 'auto' to train one "
            "(`cpsc-ray teacher --config ...`) and cache it"
        )
    if weights != "auto":
        if "://" in weights:
            return weights
        return str(Path(weights).expanduser())
    key = json.dumps(
        [
            cfg.data.model_dump(exclude={"num_workers"}),
            cfg.teacher.model_dump(exclude={"weights"}),
            # Fields added later enter the key only when set, so teachers cached before them keep their slot.
            cfg.teacher_training.model_dump(
                exclude={"label_smoothing"} if not cfg.teacher_training.label_smoothing else None
            ),
        ],
        sort_keys=True,
    )
    # Version 1 adds nothing, so the slots of teachers cached before versions existed stay where they were.
    version = ARCH_VERSIONS.get(cfg.teacher.arch, 1)
    arch = f"{cfg.teacher.arch}-v{version}" if version > 1 else cfg.teacher.arch or "custom"
    slot = f"{cfg.data.dataset}-{arch}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return str(cache_dir() / "teachers" / slot / WEIGHTS_NAME)


def weights_exist(location: str) -> bool:
    parent, name = Storage.of_file(location)
    return parent.exists(name)


def fetch_weights(location: str) -> Path:
    """A local file for weights given as a path or a URI; a URI is downloaded once, with its card."""
    if "://" not in location:
        return Path(location)
    remote, name = Storage.of_file(location)
    local = cache_dir() / "fetched" / hashlib.sha256(location.encode()).hexdigest()[:16] / name
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        card = card_path(Path(name)).name
        if remote.exists(card):
            card_path(local).write_bytes(remote.read_bytes(card))
        staging = local.with_name(f".{name}.partial")
        staging.write_bytes(remote.read_bytes(name))
        os.replace(staging, local)
    return local


def write_teacher(target: Path, state: dict[str, Tensor], card: TeacherCard) -> None:
    """Weights and card land together or not at all: written in a temporary folder, then moved."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        save_file(state, str(staging / target.name))
        card_path(staging / target.name).write_text(json.dumps(asdict(card), indent=2))
        os.chmod(staging / target.name, 0o644)
        os.replace(card_path(staging / target.name), card_path(target))
        os.replace(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
