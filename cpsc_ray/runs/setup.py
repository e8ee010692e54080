"""Setting a run up: the teacher (trained and cached when ``teacher.weights=auto``), its evaluation
sets, the engine and the run's identity, and the run directory (a new one never overwrites an old
one). Every entry point, in process or on a Ray worker, prepares its run here."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from cpsc_ray.config import ConfigError, RunConfig, to_yaml, validate_tree, with_values
from cpsc_ray.data import dataset_info
from cpsc_ray.method.engine import DistillEngine, ImageSpec, pick_device
from cpsc_ray.method.models import MODELS
from cpsc_ray.results.schema import method_label
from cpsc_ray.runs.evaluation import build_eval_sets, selection_metric, top1
from cpsc_ray.runs.run import RunIdentity
from cpsc_ray.runs.teacher import load_teacher, resolve_weights, train_teacher, weights_exist
from cpsc_ray.storage import Storage


def check_model_names(cfg: RunConfig) -> None:
    """Registry names the config cannot validate itself (models register on import, with torch): an unknown one
    fails before a teacher is trained or a run directory made."""
    for key, name in (("teacher.arch", cfg.teacher.arch), ("student.arch", cfg.student.arch)):
        if name is not None:
            MODELS.get(name, key)


def ensure_teacher(cfg: RunConfig, progress: bool = True) -> RunConfig:
    """A config whose teacher.weights is a concrete file: ``auto`` trains and caches it when missing."""
    check_model_names(cfg)
    path = resolve_weights(cfg)
    if cfg.teacher.weights == "auto" and not weights_exist(path):
        print(
            f"no cached teacher for this config: training {cfg.teacher.arch or cfg.teacher.builder} "
            f"on {cfg.data.dataset} -> {path}"
        )
        train_teacher(cfg, progress=progress)
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"weights": path})})


def local_path(path: str | None) -> str | None:
    """A relative local path made absolute against this process's working directory; URIs, ``auto``
    and None stay as they are."""
    if path is None or path == "auto" or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """The config with its local paths absolute, and the teacher cache too (``CPSC_RAY_CACHE``, which
    processes started after this one inherit): Ray workers and Tune trials run in other working
    directories, where a relative path would name another place."""
    if "CPSC_RAY_CACHE" in os.environ:
        os.environ["CPSC_RAY_CACHE"] = local_path(os.environ["CPSC_RAY_CACHE"])
    return with_values(
        cfg,
        {
            "data.root": local_path(cfg.data.root),
            "teacher.weights": local_path(cfg.teacher.weights),
            "output_dir": local_path(cfg.output_dir),
        },
    )


def dataset_label(cfg: RunConfig) -> str:
    info = dataset_info(cfg.data)
    return info.name if cfg.data.image_size is None else f"{info.name}-{info.image_size}px"


@dataclass(frozen=True)
class RunRole:
    """What a run is part of; with the config it makes the run's identity."""

    kind: str = "distill"  # distill | tune | finalize
    experiment: str = ""
    trial_id: str = "run"
    method: str | None = None  # default: "defaults" at the shipped loss settings, else "manual"
    selection: str | None = None  # default: val_acc with a validation split, else proxy


@dataclass
class Prepared:
    engine: DistillEngine
    identity: RunIdentity


def prepare_engine(cfg: RunConfig, device: torch.device | None = None, role: RunRole = RunRole()) -> Prepared:
    device = device or pick_device(cfg.train.device)
    teacher = load_teacher(cfg)
    eval_sets = build_eval_sets(cfg, teacher, device)
    spec = ImageSpec(
        teacher.info.num_classes, teacher.info.channels, teacher.info.image_size, teacher.mean, teacher.std
    )
    teacher_acc = (
        teacher.card.test_acc
        if teacher.card and teacher.card.test_acc is not None
        else top1(teacher.model.to(device), eval_sets["test"], device)
    )
    try:
        engine = DistillEngine(cfg, teacher.model, spec, eval_sets, device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    identity = RunIdentity(
        experiment=role.experiment,
        kind=role.kind,
        method=role.method or method_label(cfg),
        trial_id=role.trial_id,
        dataset=dataset_label(cfg),
        teacher=cfg.teacher.arch or cfg.teacher.builder,
        student=cfg.student.arch,
        seed=cfg.seed,
        teacher_test_acc=teacher_acc,
        workers=engine.world_size,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        selection=role.selection or selection_metric(eval_sets),
    )
    return Prepared(engine, identity)


def new_run_name(root: Storage, name: str) -> str:
    """``name`` when free, else ``name-<timestamp>``: a new run never writes into an old one."""
    if not root.exists(name):
        return name
    return f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def open_run(cfg: RunConfig, resume: str | None) -> tuple[RunConfig, Storage, str]:
    """(config, run directory, name): a new directory, or with ``resume`` the named run's own config."""
    root = Storage(cfg.output_dir)
    if resume:
        outputs = root.child(resume)
        if not outputs.exists("config.yaml"):
            raise ConfigError(f"--resume {resume}: no run of that name under {root.uri()} (no config.yaml there)")
        cfg = validate_tree(yaml.safe_load(outputs.read_text("config.yaml")), f"{outputs.uri('config.yaml')}")
        return cfg, outputs, resume
    name = new_run_name(root, cfg.name)
    outputs = root.child(name)
    outputs.write_text("config.yaml", to_yaml(cfg))
    return cfg, outputs, name
