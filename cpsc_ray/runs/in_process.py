"""A distillation in this process: the CLI's ``distill`` without ``--workers``, ``finalize``'s reruns
and the benchmarks. It drives the one epoch loop with a progress bar and writes the last checkpoint
into the run directory."""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from cpsc_ray.config import RunConfig
from cpsc_ray.method.engine import DivergenceError
from cpsc_ray.results.store import publish
from cpsc_ray.runs.checkpoints import read_checkpoint, resume_point
from cpsc_ray.runs.loop import Reporter, StartState, run_epochs
from cpsc_ray.runs.run import DistillRun, RunSummary
from cpsc_ray.runs.setup import RunRole, ensure_teacher, open_run, prepare_engine
from cpsc_ray.runs.teacher import load_teacher
from cpsc_ray.storage import Storage

PROGRESS_METRICS = ("s_total", "teacher_pseudo_acc", "class_coverage", "val_acc", "proxy", "test_acc")


class ProgressReporter(Reporter):
    def __init__(self, bar: tqdm):
        self.bar = bar

    def epoch_done(self, run: DistillRun, row: dict[str, Any], checkpoint_due: bool) -> None:
        if checkpoint_due:
            run.write_last_checkpoint()
        self.bar.update(1)
        self.bar.set_postfix({k: f"{row[k]:.3f}" for k in PROGRESS_METRICS if row.get(k) is not None})

    def diverged(self, run: DistillRun, row: dict[str, Any], error: DivergenceError) -> None:
        raise error


def execute(
    cfg: RunConfig,
    outputs: Storage,
    name: str,
    *,
    resume: bool = False,
    or_start: bool = False,
    progress: bool = True,
    schedule: dict[int, RunConfig] | None = None,
    role: RunRole | None = None,
) -> tuple[RunSummary, list[dict[str, Any]]]:
    """Run a distillation in this process into ``outputs``; returns the summary and the metric rows.
    ``schedule`` replays hyperparameter changes: each config takes effect from the epoch it is keyed by."""
    cfg = ensure_teacher(cfg, progress)
    started_at = time.time()
    role = role or RunRole()
    prepared = prepare_engine(cfg, role=RunRole(role.kind, name, role.trial_id, role.method, role.selection))
    run = DistillRun(prepared.engine, prepared.identity, outputs, started_at=started_at)
    start = None
    newest = resume_point(outputs, name, or_start=or_start) if resume else None
    if newest is not None:  # an in-process run's checkpoints/last, or a Ray Train run's newest
        start = StartState(*read_checkpoint(outputs, newest), where=outputs.uri(newest))
    with tqdm(total=cfg.train.epochs, initial=start.epoch if start else 0, desc=name, disable=not progress) as bar:
        end = run_epochs(run, ProgressReporter(bar), start=start, schedule=schedule)
    return RunSummary(**end.summary, run_dir=outputs.uri()), run.history


def run_in_process(
    cfg: RunConfig, resume: str | None = None, progress: bool = True, or_start: bool = False
) -> RunSummary:
    """A new run, or with ``resume`` the named one continued (``or_start``: started over when it has no checkpoint)."""
    if not resume:
        load_teacher(ensure_teacher(cfg, progress))  # a teacher that does not fit fails before a run dir exists
    cfg, outputs, name = open_run(cfg, resume)
    summary, history = execute(cfg, outputs, name, resume=bool(resume), or_start=or_start, progress=progress)
    publish(Storage(cfg.output_dir), name, history, [])
    return summary
