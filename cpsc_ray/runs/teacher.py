"""Teachers: ours (trained by ``cpsc-ray teacher``) or the user's own (registry arch or
``package.module:function``, plus weights). Loading checks what the config states against the data."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cpsc_ray.config import ConfigError, RunConfig, TeacherConfig
from cpsc_ray.data import DatasetInfo, dataset_info, load_splits
from cpsc_ray.method.models import ARCH_VERSIONS, MODELS, ZOO_KEYS, build_model
from cpsc_ray.runs.evaluation import materialize, top1
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


class FeatureTap(nn.Module):
    """Gives a model without ``return_features`` the (logits, features) API. The penultimate feature is
    the named layer's output (globally average-pooled when it is a feature map) or, with no layer named,
    the input of the last linear layer the forward pass calls: a classifier's head, whatever the family
    names it (``fc``, ``classifier.1``, ``head``)."""

    def __init__(self, model: nn.Module, layer: str | None, probe: Tensor):
        super().__init__()
        self.model = model
        self._features: Tensor | None = None
        modules = dict(model.named_modules())
        if layer is None:
            modules[last_linear(model, probe)].register_forward_pre_hook(self._keep_input)
            return
        if layer not in modules:
            names = ", ".join(n for n in modules if n) or "(none)"
            raise ConfigError(f"teacher.feature_layer: the model has no layer {layer!r}; its layers are: {names}")
        modules[layer].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs, output: Tensor) -> None:
        self._features = output

    def _keep_input(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._features = inputs[0]

    def forward(self, x: Tensor, return_features: bool = False):
        logits = self.model(x)
        if not return_features:
            return logits
        features = self._features
        if features.dim() == 4:
            features = F.adaptive_avg_pool2d(features, 1)
        return logits, torch.flatten(features, 1)


def last_linear(model: nn.Module, probe: Tensor) -> str:
    """The name of the last ``nn.Linear`` a forward pass of ``probe`` calls."""
    names = {module: name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    called: list[str] = []
    handles = [module.register_forward_pre_hook(lambda m, _: called.append(names[m])) for module in names]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    if not called:
        raise ConfigError(
            "teacher.feature_layer: this model has no return_features argument and no linear classifier layer "
            "whose input could serve as its penultimate feature; name the layer (e.g. teacher.feature_layer=avgpool)"
        )
    return called[-1]


# Builders that configs, run directories' config.yaml and experiments' setup.json name by the module paths
# from before the package was layered (cpsc_ray.models:build_model): old prefix -> where it lives now.
MOVED_MODULES = {"cpsc_ray.models": "cpsc_ray.method.models"}


def current_module(name: str) -> str:
    """``name`` with a moved prefix replaced, e.g. ``cpsc_ray.models.resnet`` -> ``cpsc_ray.method.models.resnet``."""
    for old, new in MOVED_MODULES.items():
        if name == old or name.startswith(f"{old}."):
            return new + name.removeprefix(old)
    return name


def _import_builder(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"teacher.builder: expected 'package.module:function', got {spec!r}")
    module_name = current_module(module_name)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"teacher.builder: cannot import {spec!r} ({err}); is its package installed on this node?"
        ) from None


def _supports_features(model: nn.Module) -> bool:
    return "return_features" in inspect.signature(model.forward).parameters


def build_teacher_model(cfg: TeacherConfig, num_classes: int, channels: int) -> nn.Module:
    if cfg.arch is not None:
        MODELS.get(cfg.arch, "teacher.arch")  # an unknown name fails naming the field
        model = build_model(cfg.arch, num_classes, channels, **cfg.kwargs)
    else:
        model = _import_builder(cfg.builder)(**cfg.kwargs)
    return model


def with_features(model: nn.Module, cfg: TeacherConfig, info: DatasetInfo) -> nn.Module:
    """The model itself when it has ``return_features`` and no layer is named, else a ``FeatureTap``."""
    if cfg.feature_layer is None and _supports_features(model):
        return model
    return FeatureTap(model, cfg.feature_layer, torch.zeros(2, info.channels, info.image_size, info.image_size))


def _gist(error: Exception) -> str:
    """A load error's reason in one line: torch's weights-only refusal, pages long, states it after
    "WeightsUnpickler error:" in its first sentence."""
    reason = str(error).rpartition("WeightsUnpickler error:")[2].strip()
    return " ".join(reason.split("\n\n")[0].split(". ")[0].split())


def read_weights(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - safetensors and torch raise many types for a bad file
        raise ConfigError(
            f"teacher.weights: {path} is not a loadable weights file ({_gist(err)}); give a safetensors file or a "
            "state dict saved with torch.save (a whole pickled model is refused: loading it runs code from the file)"
        ) from None
    for key in ("state_dict", "model", "net"):  # a training checkpoint that holds the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"teacher.weights: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _stated(cfg: TeacherConfig, card: TeacherCard | None, info: DatasetInfo) -> None:
    """Every statement about the teacher (config fields, sidecar) must agree with the dataset."""
    for field, expected in (
        ("num_classes", info.num_classes),
        ("input_size", info.image_size),
        ("channels", info.channels),
    ):
        for source, value in (
            (f"teacher.{field}", getattr(cfg, field)),
            ("teacher.weights sidecar", getattr(card, field, None)),
        ):
            if value is not None and value != expected:
                raise ConfigError(
                    f"{source}: the teacher has {field}={value} but data.dataset={info.name} gives {expected}; "
                    f"use a teacher trained for this data, or fix data.dataset / data.image_size"
                )


def _check_version(cfg: TeacherConfig, card: TeacherCard | None, path: Path) -> None:
    """Weights trained by an older version of a registry architecture would load (same keys) but compute
    something else."""
    if card is None or cfg.arch is None or card.arch != cfg.arch:
        return
    trained, current = card.arch_version or 1, ARCH_VERSIONS[cfg.arch]
    if trained != current:
        raise ConfigError(
            f"teacher.weights: {path} was trained on {cfg.arch} version {trained}, but {cfg.arch} is now version "
            f"{current} (its network changed); retrain it with `cpsc-ray teacher`, or use teacher.weights=auto"
        )


def _our_names(keys: list[str], arch: str | None) -> dict[str, str]:
    """Our name for each key of a checkpoint: the reference's (CRD/CMI model zoo) names are renamed, ours kept."""
    rename = ZOO_KEYS.get(arch)
    return {rename(k) if rename else k: k for k in keys}


def _listed(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_classes(model: nn.Module, info: DatasetInfo) -> None:
    with torch.no_grad():
        logits = model.eval()(torch.zeros(2, info.channels, info.image_size, info.image_size))
    if logits.shape[1] != info.num_classes:
        raise ConfigError(
            f"teacher.num_classes: the teacher outputs {logits.shape[1]} classes but data.dataset={info.name} "
            f"has {info.num_classes}"
        )


def resolve_weights(cfg: RunConfig) -> str:
    """The teacher's weights file (a path or a URI); ``auto`` names the cache slot ``train_teacher`` fills."""
    weights = cfg.teacher.weights
    if weights is None:
        raise ConfigError(
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


@dataclass
class Teacher:
    model: nn.Module
    location: str  # where the weights live (path or URI): the probe set is stored beside them
    weights: Path  # a local copy
    card: TeacherCard | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: DatasetInfo


def load_teacher(cfg: RunConfig) -> Teacher:
    info = dataset_info(cfg.data)
    location = resolve_weights(cfg)
    if not weights_exist(location):
        hint = "train it with `cpsc-ray teacher`" if cfg.teacher.weights == "auto" else "check the path"
        raise ConfigError(f"teacher.weights: {location} does not exist; {hint}")
    path = fetch_weights(location)
    card = TeacherCard(**json.loads(card_path(path).read_text())) if card_path(path).is_file() else None
    _stated(cfg.teacher, card, info)
    model = build_teacher_model(cfg.teacher, info.num_classes, info.channels)
    _check_version(cfg.teacher, card, path)
    state = read_weights(path)
    names = _our_names(list(state), cfg.teacher.arch)
    missing, unexpected = [], []
    try:
        result = model.load_state_dict({ours: state[theirs] for ours, theirs in names.items()}, strict=False)
        missing, unexpected = result.missing_keys, [names[k] for k in result.unexpected_keys]
    except RuntimeError as err:
        first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)
        raise ConfigError(f"teacher.weights: {path} does not fit the configured teacher: {first.strip()}") from None
    if missing or unexpected:
        raise ConfigError(
            f"teacher.weights: {path} does not fit the configured teacher (key names as in cpsc-ray or the CRD/CMI "
            f"zoo); the model's keys missing from the file: {_listed(missing) or 'none'}; the file's keys the "
            f"model lacks: {_listed(unexpected) or 'none'}; check teacher.arch/builder"
        )
    model = with_features(model.eval().requires_grad_(False), cfg.teacher, info)
    _check_classes(model, info)
    mean = tuple(cfg.teacher.mean or (card.mean if card else info.mean))
    std = tuple(cfg.teacher.std or (card.std if card else info.std))
    if len(mean) != info.channels or len(std) != info.channels:
        raise ConfigError(f"teacher.mean/std: one value per channel expected ({info.channels}), got {mean} / {std}")
    return Teacher(model, location, path, card, mean, std, info)


def teacher_path(cfg: RunConfig, out: Path | None = None) -> Path:
    """Where ``train_teacher`` writes the configured teacher: under ``out``, else in its cache slot."""
    auto = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"weights": "auto"})})
    return out / WEIGHTS_NAME if out else Path(resolve_weights(auto))


def train_teacher(
    cfg: RunConfig, out: Path | None = None, device: torch.device | None = None, progress: bool = True
) -> Path:
    """Train the configured teacher (registry arch or builder) on real data (SGD, cosine, standard augmentation)
    and write ``teacher.safetensors`` plus its JSON card; the val hold-out is excluded from training."""
    target = teacher_path(cfg, out)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tcfg = cfg.teacher_training
    torch.manual_seed(tcfg.seed)
    splits = load_splits(cfg.data, augment=True)
    arch = cfg.teacher.arch or cfg.teacher.builder
    model = build_teacher_model(cfg.teacher, splits.info.num_classes, splits.info.channels)
    _check_classes(model, splits.info)  # a builder's kwargs set its class count: fail before training, not after
    model.to(device)
    loader = DataLoader(
        splits.train,
        batch_size=tcfg.batch_size,
        shuffle=True,
        drop_last=len(splits.train) > tcfg.batch_size,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(tcfg.seed),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    steps = tcfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    bar = tqdm(range(tcfg.epochs), desc=f"teacher {arch}", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        for images, labels in loader:
            loss = F.cross_entropy(model(images.to(device)), labels.to(device), label_smoothing=tcfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    card = TeacherCard(
        arch=arch,
        dataset=splits.info.name,
        num_classes=splits.info.num_classes,
        input_size=splits.info.image_size,
        channels=splits.info.channels,
        mean=list(splits.info.mean),
        std=list(splits.info.std),
        test_acc=top1(model, materialize(splits.test), device),
        val_acc=top1(model, materialize(splits.val), device) if splits.val is not None else None,
        epochs=tcfg.epochs,
        seed=tcfg.seed,
        arch_version=ARCH_VERSIONS.get(cfg.teacher.arch),
    )
    write_teacher(target, {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, card)
    return target


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
