"""Loading a teacher: the model (a registry arch or the user's ``package.module:function``) with its weights, every
statement about it (config fields, card) checked against the data, and the (logits, features) API."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from cpsc_ray.compat import current_module
from cpsc_ray.config import Config, TeacherConfig
from cpsc_ray.data import DatasetInfo, dataset_info
from cpsc_ray.errors import InputError
from cpsc_ray.method.models import ARCH_VERSIONS, MODELS, ZOO_KEYS, build_model
from cpsc_ray.runs.teacher.card import TeacherCard, fetch_weights, read_card, resolve_weights, weights_exist


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
            raise InputError(f"teacher.feature_layer: the model has no layer {layer!r}; its layers are: {names}")
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
        raise InputError(
            "teacher.feature_layer: this model has no return_features argument and no linear classifier layer "
            "whose input could serve as its penultimate feature; name the layer (e.g. teacher.feature_layer=avgpool)"
        )
    return called[-1]


def _import_builder(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"teacher.builder: expected 'package.module:function', got {spec!r}")
    module_name = current_module(module_name)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise InputError(
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
        raise InputError(
            f"teacher.weights: {path} is not a loadable weights file ({_gist(err)}); give a safetensors file or a "
            "state dict saved with torch.save (a whole pickled model is refused: loading it runs code from the file)"
        ) from None
    for key in ("state_dict", "model", "net"):  # a training checkpoint that holds the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"teacher.weights: {path} does not hold a state dict of tensors")
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
                raise InputError(
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
        raise InputError(
            f"teacher.weights: {path} was trained on {cfg.arch} version {trained}, but {cfg.arch} is now version "
            f"{current} (its network changed); retrain it with `cpsc-ray teacher`, or use teacher.weights=auto"
        )


def _our_names(keys: list[str], arch: str | None) -> dict[str, str]:
    """Our name for each key of a checkpoint: the reference's (CRD/CMI model zoo) names are renamed, ours kept."""
    rename = ZOO_KEYS.get(arch)
    return {rename(k) if rename else k: k for k in keys}


def _listed(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_classes(model: nn.Module, info: DatasetInfo) -> None:
    with torch.no_grad():
        logits = model.eval()(torch.zeros(2, info.channels, info.image_size, info.image_size))
    if logits.shape[1] != info.num_classes:
        raise InputError(
            f"teacher.num_classes: the teacher outputs {logits.shape[1]} classes but data.dataset={info.name} "
            f"has {info.num_classes}"
        )


@dataclass
class Teacher:
    model: nn.Module
    location: str  # where the weights live (path or URI): the probe set is stored beside them
    weights: Path  # a local copy
    card: TeacherCard | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: DatasetInfo


def load_teacher(cfg: Config) -> Teacher:
    info = dataset_info(cfg.data)
    location = resolve_weights(cfg)
    if not weights_exist(location):
        hint = "train it with `cpsc-ray teacher`" if cfg.teacher.weights == "auto" else "check the path"
        raise InputError(f"teacher.weights: {location} does not exist; {hint}")
    path = fetch_weights(location)
    card = read_card(path)
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
        raise InputError(f"teacher.weights: {path} does not fit the configured teacher: {first.strip()}") from None
    if missing or unexpected:
        raise InputError(
            f"teacher.weights: {path} does not fit the configured teacher (key names as in cpsc-ray or the CRD/CMI "
            f"zoo); the model's keys missing from the file: {_listed(missing) or 'none'}; the file's keys the "
            f"model lacks: {_listed(unexpected) or 'none'}; check teacher.arch/builder"
        )
    model = with_features(model.eval().requires_grad_(False), cfg.teacher, info)
    check_classes(model, info)
    mean = tuple(cfg.teacher.mean or (card.mean if card else info.mean))
    std = tuple(cfg.teacher.std or (card.std if card else info.std))
    if len(mean) != info.channels or len(std) != info.channels:
        raise InputError(f"teacher.mean/std: one value per channel expected ({info.channels}), got {mean} / {std}")
    return Teacher(model, location, path, card, mean, std, info)
