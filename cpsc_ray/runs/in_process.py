"""A distillation in this process: the CLI's ``distill`` without ``--workers`` (``run_in_process``), each seed of
``finalize`` and the benchmarks (``train_into`` a given run directory). Its epochs show on a progress bar; it
writes the last checkpoint into the run directory."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from tqdm import tqdm

from cpsc_ray.config import Config
from cpsc_ray.layout import RootDir, RunDir
from cpsc_ray.method.engine import DIVERGENCE_FIX, DivergenceError
from cpsc_ray.results.tables import publish
from cpsc_ray.runs.assembly import RunRole, check_model_names, open_run, run_distillation
from cpsc_ray.runs.checkpoints import read_checkpoint, resume_point
from cpsc_ray.runs.loop import EpochHooks, StartState
from cpsc_ray.runs.run import DistillRun, RunSummary
from cpsc_ray.runs.teacher import Teacher, ensure_teacher, load_teacher

PROGRESS_METRICS = ("s_total", "teacher_pseudo_acc", "class_coverage", "val_acc", "proxy", "test_acc")


class ProgressHooks(EpochHooks):
    def __init__(self, bar: tqdm):
        self.bar = bar

    def epoch_done(self, run: DistillRun, row: dict[str, Any], checkpoint_due: bool) -> None:
        if checkpoint_due:
            run.write_last_checkpoint()
        self.bar.update(1)
        self.bar.set_postfix({k: f"{row[k]:.3f}" for k in PROGRESS_METRICS if row.get(k) is not None})

    def diverged(self, run: DistillRun, row: dict[str, Any], error: DivergenceError) -> None:
        raise DivergenceError(f"{error}; the run's metrics so far are kept: {DIVERGENCE_FIX}") from error


def train_into(
    cfg: Config,
    outputs: RunDir,
    name: str,
    *,
    teacher: Teacher | None = None,
    resume: bool = False,
    or_start: bool = False,
    progress: bool = True,
    phases: dict[int, Config] | None = None,
    role: RunRole | None = None,
    started_at: float | None = None,
) -> tuple[RunSummary, list[dict[str, Any]]]:
    """Train a distillation in this process into the run directory ``outputs`` (with ``resume``, from its newest
    checkpoint); returns the summary and the metric rows. ``cfg`` names the teacher's file (``ensure_teacher``).
    ``phases`` replays hyperparameter changes: each config takes effect from the epoch it is keyed by."""
    started_at = started_at or time.time()
    start = None
    newest = resume_point(outputs, name, or_start=or_start) if resume else None
    if newest is not None:  # an in-process run's checkpoints/last, or a Ray Train run's newest
        start = StartState(*read_checkpoint(outputs, newest), where=outputs.uri(newest))
    with tqdm(total=cfg.train.epochs, initial=start.epoch if start else 0, desc=name, disable=not progress) as bar:
        run, end = run_distillation(
            cfg,
            dataclasses.replace(role or RunRole(), experiment=name),
            outputs,
            ProgressHooks(bar),
            teacher=teacher,
            started_at=started_at,
            start=start,
            phases=phases,
        )
    return RunSummary(**end.summary, run_dir=outputs.uri()), run.history


def run_in_process(cfg: Config, resume: str | None = None, progress: bool = True, or_start: bool = False) -> RunSummary:
    """The CLI's ``distill`` without ``--workers``: a new run directory under ``output_dir`` (or, with ``resume``,
    the named run with its own config, continued; ``or_start``: started over when it has no complete checkpoint),
    the run trained into it, and its rows published to the results."""
    if resume:
        cfg, outputs, name = open_run(cfg, resume)
    check_model_names(cfg)
    resolved = ensure_teacher(cfg, progress)
    started_at = time.time()
    teacher = load_teacher(resolved)  # a teacher that does not fit fails before a new run's directory exists
    if not resume:
        cfg, outputs, name = open_run(cfg, None)
    summary, history = train_into(
        resolved,
        outputs,
        name,
        teacher=teacher,
        resume=bool(resume),
        or_start=or_start,
        progress=progress,
        started_at=started_at,
    )
    publish(RootDir(cfg.output_dir), name, history, [])
    return summary
