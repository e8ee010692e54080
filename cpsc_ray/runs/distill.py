"""Setting up a distillation run (teacher, evaluation sets, engine, run directory) and running it
in this process. The Ray Train layer reuses ``prepare_engine`` on every worker."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from tqdm import tqdm

from cpsc_ray.config import ConfigError, RunConfig, to_yaml, validate_tree
from cpsc_ray.data import dataset_info
from cpsc_ray.method.engine import DistillEngine, ImageSpec, pick_device
from cpsc_ray.runs.evaluation import build_eval_sets, selection_metric, top1
from cpsc_ray.results.records import method_label, publish
from cpsc_ray.runs.run import LAST, META_FILE, DistillRun, read_checkpoint, restore_engine
from cpsc_ray.storage import Storage
from cpsc_ray.runs.teacher import load_teacher, resolve_weights, train_teacher, weights_exist


def ensure_teacher(cfg: RunConfig, progress: bool = True) -> RunConfig:
    """A config whose teacher.weights is a concrete file: ``auto`` trains and caches it when missing."""
    path = resolve_weights(cfg)
    if cfg.teacher.weights == "auto" and not weights_exist(path):
        print(
            f"no cached teacher for this config: training {cfg.teacher.arch or cfg.teacher.builder} "
            f"on {cfg.data.dataset} -> {path}"
        )
        train_teacher(cfg, progress=progress)
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"weights": path})})


def dataset_label(cfg: RunConfig) -> str:
    info = dataset_info(cfg.data)
    return info.name if cfg.data.image_size is None else f"{info.name}-{info.image_size}px"


@dataclass
class Prepared:
    engine: DistillEngine
    identity: dict[str, Any]
    selection: str | None


def prepare_engine(
    cfg: RunConfig,
    device: torch.device | None = None,
    kind: str = "distill",
    trial_id: str = "run",
    experiment: str = "",
    method: str | None = None,
) -> Prepared:
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
    identity = {
        "experiment": experiment,
        "kind": kind,
        "method": method or method_label(cfg),
        "trial_id": trial_id,
        "dataset": dataset_label(cfg),
        "teacher": cfg.teacher.arch or cfg.teacher.builder,
        "student": cfg.student.arch,
        "seed": cfg.seed,
        "teacher_test_acc": teacher_acc,
        "workers": engine.world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    return Prepared(engine, identity, selection_metric(eval_sets))


def new_run_name(root: Storage, name: str) -> str:
    """``name`` when free, else ``name-<timestamp>``: a new run never writes into an old one."""
    if not root.exists(name):
        return name
    return f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def open_run(cfg: RunConfig, resume: str | None) -> tuple[RunConfig, Storage, str]:
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


def execute(
    cfg: RunConfig,
    outputs: Storage,
    name: str,
    *,
    resume: bool = False,
    progress: bool = True,
    schedule: list[tuple[int, RunConfig]] | None = None,
    kind: str = "distill",
    trial_id: str = "run",
    method: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run a distillation in this process into ``outputs``; returns the summary and the metric rows.
    ``schedule`` replays hyperparameter changes: each config takes effect from its first epoch."""
    cfg = ensure_teacher(cfg, progress)
    prepared = prepare_engine(cfg, kind=kind, trial_id=trial_id, experiment=name, method=method)
    engine = prepared.engine
    run = DistillRun(engine, prepared.identity, outputs, prepared.selection)
    if resume and outputs.exists(f"{LAST}/{META_FILE}"):
        state, meta = read_checkpoint(outputs, LAST)
        restore_engine(engine, state, outputs.uri(LAST))
        run.resume_from(meta)
    changes = {epoch: later for epoch, later in (schedule or [])[1:]}
    bar = tqdm(total=cfg.train.epochs, initial=engine.epoch, desc=name, disable=not progress)
    while not run.done:
        if engine.epoch + 1 in changes:
            engine.apply_hyperparameters(changes[engine.epoch + 1])
        row = run.run_epoch()
        if run.checkpoint_due():
            run.write_last_checkpoint()
        bar.update(1)
        bar.set_postfix(
            {
                k: f"{row[k]:.3f}"
                for k in ("s_total", "teacher_pseudo_acc", "class_coverage", "val_acc", "proxy", "test_acc")
                if row.get(k) is not None
            }
        )
    bar.close()
    summary = run.finish()
    summary["run_dir"] = outputs.uri()
    return summary, run.history


def run_in_process(cfg: RunConfig, resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    if not resume:
        load_teacher(ensure_teacher(cfg, progress))  # a teacher that does not fit fails before a run dir exists
    cfg, outputs, name = open_run(cfg, resume)
    summary, history = execute(cfg, outputs, name, resume=bool(resume), progress=progress)
    publish(Storage(cfg.output_dir), name, history, [])
    return summary
