"""The one epoch loop. Every entry point runs a distillation through ``run_epochs`` (``runs.assembly``): an
in-process run, each Ray Train worker, a Tune trial, one round of a multi-worker PBT trial. The loop restores,
runs epochs, decides when a checkpoint is due, hands each epoch to the entry point's ``EpochHooks`` and finishes;
what is done with an epoch (a progress bar, ``ray.train.report``, ``tune.report``) is the hooks' business."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpsc_ray.config import Config
from cpsc_ray.method.engine import DivergenceError
from cpsc_ray.results.lineage import Exploit, forget_clones_after
from cpsc_ray.runs.checkpoints import BEST_STUDENT, restore_engine
from cpsc_ray.runs.exploit import record_exploit
from cpsc_ray.runs.run import DistillRun, RunSummary


@dataclass(frozen=True)
class StartState:
    """A checkpoint to continue from: the engine state, its meta, where it lives, and the PBT clone
    it is, when a trial starts from another trial's state."""

    state: dict
    meta: dict[str, Any]
    where: str
    exploit: Exploit | None = None

    @property
    def epoch(self) -> int:
        return self.meta["epoch"]

    @property
    def trial_id(self) -> str:
        return self.meta["identity"]["trial_id"]


class EpochHooks:
    """What an entry point does around each epoch. The defaults do nothing; an entry point overrides what it needs."""

    def before_epoch(self, run: DistillRun, epoch: int) -> None:
        """Called before ``epoch`` (1-based) trains."""

    def epoch_done(self, run: DistillRun, row: dict[str, Any], checkpoint_due: bool) -> None:
        """Called after every epoch, with its row; ``checkpoint_due`` says a checkpoint belongs here."""

    def diverged(self, run: DistillRun, row: dict[str, Any], error: DivergenceError) -> None:
        """Called once when a loss became NaN or infinite (``row`` records it); the run stops after it.
        Re-raise ``error`` to end the caller too."""


def checkpoint_due(epoch: int, every: int, stop_epoch: int) -> bool:
    """Every ``every`` epochs (the PBT perturbation interval for population-based trials, else
    ``train.checkpoint_every``) and at the epoch the loop stops at (the end of a run or of a round)."""
    return epoch % every == 0 or epoch >= stop_epoch


@dataclass
class LoopEnd:
    diverged: bool
    summary: RunSummary | None  # the run's summary when it ran to its last epoch and ``finish`` was asked


def run_epochs(
    run: DistillRun,
    hooks: EpochHooks,
    *,
    start: StartState | None = None,
    stop_epoch: int | None = None,
    checkpoint_every: int | None = None,
    phases: dict[int, Config] | None = None,
    finish: bool = True,
) -> LoopEnd:
    """Restore from ``start``, then train epochs until ``stop_epoch`` (default: the run's last).
    ``phases`` replays hyperparameter changes: each config takes effect from the epoch it is keyed by."""
    engine = run.engine
    if start is not None:
        restore_engine(engine, start.state, start.where)
        run.resume_from(start.meta, start.state.get(BEST_STUDENT))
        if run.outputs is not None:
            forget_clones_after(run.outputs, start.epoch, start.where)
            if start.exploit is not None:
                record_exploit(run.outputs, engine, start.exploit)
    stop = stop_epoch or run.cfg.train.epochs
    every = checkpoint_every or run.cfg.train.checkpoint_every
    while engine.epoch < stop:
        epoch = engine.epoch + 1
        if phases and epoch in phases:
            engine.apply_hyperparameters(phases[epoch])
        hooks.before_epoch(run, epoch)
        try:
            row = run.run_epoch()
        except DivergenceError as error:
            hooks.diverged(run, run.history[-1], error)
            return LoopEnd(diverged=True, summary=None)
        hooks.epoch_done(run, row, checkpoint_due(engine.epoch, every, stop))
    return LoopEnd(diverged=False, summary=run.finish() if finish and run.done else None)
