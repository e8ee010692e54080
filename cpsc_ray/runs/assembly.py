"""Assembling a run from its config: the engine, with the teacher and its evaluation sets, the run's identity,
the run directory (a new one never overwrites an old one), and the run itself trained through the one loop.
Every entry point (in process, each Ray Train worker, a Tune trial) runs its distillation with
``run_distillation``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from cpsc_ray.config import Config, to_yaml, validate_tree, with_values
from cpsc_ray.data import load_splits
from cpsc_ray.errors import InputError
from cpsc_ray.layout import RootDir, RunDir
from cpsc_ray.method.device import pick_device
from cpsc_ray.method.engine import DistillEngine
from cpsc_ray.method.models import MODELS
from cpsc_ray.method.spec import EvalSet, ImageSpec
from cpsc_ray.method.synthesis import SynthesizerBuilder
from cpsc_ray.results.schema import method_label
from cpsc_ray.runs.evaluation import materialize, selection_metric, top1
from cpsc_ray.runs.loop import EpochHooks, LoopEnd, StartState, run_epochs
from cpsc_ray.runs.probe import load_or_make_probe
from cpsc_ray.runs.run import DistillRun, RunIdentity
from cpsc_ray.runs.teacher import Teacher, load_teacher


def check_model_names(cfg: Config) -> None:
    """Registry names the config cannot validate itself (models register on import, with torch): an unknown one
    fails before a teacher is trained or a run directory made."""
    for key, name in (("teacher.arch", cfg.teacher.arch), ("student.arch", cfg.student.arch)):
        if name is not None:
            MODELS.get(name, key)


def local_path(path: str | None) -> str | None:
    """A relative local path made absolute against this process's working directory; URIs, ``auto``
    and None stay as they are."""
    if path is None or path == "auto" or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def with_absolute_paths(cfg: Config) -> Config:
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


def build_eval_sets(cfg: Config, teacher: Teacher, device: torch.device) -> dict[str, EvalSet]:
    splits = load_splits(cfg.data, augment=False, mean=teacher.mean, std=teacher.std)
    sets = {"test": materialize(splits.test, num_workers=cfg.data.num_workers)}
    if splits.val is not None:
        sets["val"] = materialize(splits.val, num_workers=cfg.data.num_workers)
    if cfg.eval.probe_per_class:
        sets["proxy"] = EvalSet(*load_or_make_probe(teacher, cfg.eval, device))
    return sets


@dataclass(frozen=True)
class RunRole:
    """What a run is part of; with the config it makes the run's identity."""

    kind: str = "distill"  # distill | tune | finalize
    experiment: str = ""
    trial_id: str = "run"
    method: str | None = None  # default: "defaults" at the shipped loss settings, else "manual"
    selection: str | None = None  # default: val_acc with a validation split, else proxy
    source_experiment: str | None = None  # finalize: the tuning experiment it reruns


@dataclass
class Prepared:
    engine: DistillEngine
    identity: RunIdentity


def prepare_engine(
    cfg: Config,
    device: torch.device | None = None,
    role: RunRole = RunRole(),
    teacher: Teacher | None = None,
    synthesizer: SynthesizerBuilder | None = None,
) -> Prepared:
    """The engine and the run's identity; the teacher is loaded unless given, the synthesizer is the one
    ``generator.kind`` names unless given."""
    device = device or pick_device(cfg.train.device)
    teacher = teacher or load_teacher(cfg)
    eval_sets = build_eval_sets(cfg, teacher, device)
    info = teacher.info
    spec = ImageSpec(info.num_classes, info.channels, info.image_size, teacher.mean, teacher.std)
    teacher_acc = (
        teacher.card.test_acc
        if teacher.card and teacher.card.test_acc is not None
        else top1(teacher.model.to(device), eval_sets["test"], device)
    )
    try:
        engine = DistillEngine(cfg, teacher.model, spec, eval_sets, device, synthesizer)
    except ValueError as err:
        raise InputError(str(err)) from None
    identity = RunIdentity(
        experiment=role.experiment,
        kind=role.kind,
        method=role.method or method_label(cfg),
        trial_id=role.trial_id,
        dataset=info.name if cfg.data.image_size is None else f"{info.name}-{info.image_size}px",
        teacher=cfg.teacher.arch or cfg.teacher.builder,
        student=cfg.student.arch,
        seed=cfg.seed,
        teacher_test_acc=teacher_acc,
        workers=engine.world_size,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        selection=role.selection or selection_metric(eval_sets),
        source_experiment=role.source_experiment,
    )
    return Prepared(engine, identity)


def run_distillation(
    cfg: Config,
    role: RunRole,
    outputs: RunDir | None,
    hooks: EpochHooks,
    *,
    teacher: Teacher | None = None,
    device: torch.device | None = None,
    keep_best: bool = True,
    started_at: float | None = None,
    queued_s: float = 0.0,
    start: StartState | None = None,
    stop_epoch: int | None = None,
    checkpoint_every: int | None = None,
    phases: dict[int, Config] | None = None,
    finish: bool = True,
) -> tuple[DistillRun, LoopEnd]:
    """Assemble the run (its engine and the bookkeeping that writes ``outputs``: None on ranks other than 0) and
    train it through the one loop (``run_epochs``: ``start``, ``stop_epoch``, ``checkpoint_every``, ``phases``,
    ``finish``). ``started_at`` (``time.time()``) is when this start began: the set-up until its first epoch is
    charged to that epoch, less ``queued_s``, the part of it spent waiting for resources."""
    prepared = prepare_engine(cfg, device, role, teacher)
    run = DistillRun(prepared.engine, prepared.identity, outputs, keep_best, started_at=started_at, queued_s=queued_s)
    end = run_epochs(
        run,
        hooks,
        start=start,
        stop_epoch=stop_epoch,
        checkpoint_every=checkpoint_every,
        phases=phases,
        finish=finish,
    )
    return run, end


def written_config(outputs: RunDir) -> Config:
    """The config a run wrote into its directory, validated as any config is."""
    return validate_tree(yaml.safe_load(outputs.read_text(RunDir.CONFIG)), outputs.uri(RunDir.CONFIG))


def open_run(cfg: Config, resume: str | None) -> tuple[Config, RunDir, str]:
    """(config, run directory, name): a new directory, or with ``resume`` the named run's own config."""
    root = RootDir(cfg.output_dir)
    if resume:
        outputs = root.run(resume)
        if not outputs.exists(RunDir.CONFIG):
            raise InputError(f"--resume {resume}: no run of that name under {root.uri()} (no {RunDir.CONFIG} there)")
        return written_config(outputs), outputs, resume
    name = root.free_name(cfg.name)
    outputs = root.run(name)
    outputs.write_text(RunDir.CONFIG, to_yaml(cfg))
    return cfg, outputs, name
