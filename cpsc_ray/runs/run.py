"""A distillation run's bookkeeping around the engine: evaluation, model selection without the test
set, per-epoch metrics in Parquet, the best student, checkpoints' meta, the sample grid and the
summary. ``runs.loop`` drives it the same way for every entry point; only rank 0 writes.

Rank 0 writes the run directory (``layout.RunDir``): the config, a metrics row per epoch, the last
checkpoint's files, the best student, the sample grid after the last epoch, the summary, and TensorBoard
scalars (``runs.tensorboard``; not tuning trials).

Compute is charged to the run that spent it: epochs lost to a restart (and run again) and each start's
set-up are added to the first epoch after it (``lost_images``, ``overhead_s``), so a trial's totals hold
all the work it did, not only the work its surviving rows show. The time a start waited for its worker
group's resources (other jobs' GPUs, a node still booting) is no work: it is recorded as ``queued_s``,
never charged.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, NotRequired, TypedDict

from safetensors.torch import save

from cpsc_ray.config import Config, to_yaml
from cpsc_ray.layout import RunDir
from cpsc_ray.method.engine import DistillEngine, DivergenceError
from cpsc_ray.results.plots import sample_grid
from cpsc_ray.results.schema import EVAL_METRICS, config_row, epoch_table, versions
from cpsc_ray.results.tables import charged_device_s, charged_images, latest, run_name
from cpsc_ray.runs.checkpoints import checkpoint_files, write_last_checkpoint
from cpsc_ray.runs.evaluation import METRIC_OF_SET
from cpsc_ray.runs.health import HealthMonitor
from cpsc_ray.runs.tensorboard import EpochScalars


@dataclass(frozen=True)
class RunIdentity:
    """Who a run is: the identity columns of every row it writes (results' IDENTITY)."""

    experiment: str
    kind: str  # distill | tune | finalize
    method: str
    trial_id: str
    dataset: str
    teacher: str
    student: str
    seed: int
    teacher_test_acc: float | None
    workers: int
    device: str
    selection: str | None  # the metric that picks the best epoch: val_acc, proxy, or None
    source_experiment: str | None = None  # finalize: the tuning experiment it reruns

    def columns(self) -> dict[str, Any]:
        return asdict(self)


class Selection(TypedDict):
    metric: str | None  # val_acc | proxy | None (no selection set)
    value: float | None
    epoch: int | None


class RunSummary(TypedDict):
    """A finished run, as ``summary.json`` holds it (entry points may add ``run_dir``)."""

    run: str
    epochs: int
    teacher_test_acc: float | None
    selected_by: Selection
    best: dict[str, float | None] | None  # EVAL_METRICS at the selected epoch
    last: dict[str, float | None]  # EVAL_METRICS at the last epoch
    images: int
    device_s: float
    wall_s: float
    warnings: list[str]
    run_dir: NotRequired[str]


def sample_grid_png(engine: DistillEngine, identity: RunIdentity) -> bytes:
    classes = engine.spec.num_classes
    per_class = 8 if classes <= 20 else 4
    images, labels = engine.preview(per_class)
    shown = labels < 50  # a grid of 200 classes helps nobody
    run = run_name(identity.kind, identity.experiment, identity.trial_id)
    title = f"{run}: synthetic images after epoch {engine.epoch}, one row per class"
    return sample_grid(images[shown].permute(0, 2, 3, 1).numpy(), labels[shown].numpy(), title)


class DistillRun:
    def __init__(
        self,
        engine: DistillEngine,
        identity: RunIdentity,
        outputs: RunDir | None,
        keep_best: bool = True,
        started_at: float | None = None,
        queued_s: float = 0.0,
    ):
        """``started_at`` (``time.time()``) is when this start began: its set-up up to the first epoch is
        charged to that epoch, less ``queued_s``, the part of it spent waiting for resources. Default: now."""
        self.engine = engine
        self.identity = identity
        self.outputs = outputs  # None on ranks other than 0
        self.selection = identity.selection
        self.keep_best = keep_best  # tuning trials skip it: `finalize` reruns the chosen config instead
        self.history: list[dict[str, Any]] = []
        self.best = Selection(metric=self.selection, value=None, epoch=None)
        self._best_student: dict[str, Any] | None = None  # CPU copy of the best weights, for checkpoints
        self.health = HealthMonitor(engine.cfg, engine.spec.num_classes, self.selection)
        self.scalars = EpochScalars.for_run(outputs, identity.kind)
        self._wall_before = 0.0
        self._started = time.perf_counter()
        # Rows already written belong to an earlier start of this run; unless a checkpoint keeps them
        # (``resume_from``) they were lost with it, and their work is charged to the next epoch.
        self._written = self._read_rows()
        self._setup_from = max([started_at or time.time(), *self._written_at()])
        self._queued_s = queued_s
        self._lost = self._written

    def _read_rows(self) -> list[dict[str, Any]]:
        return [] if self.outputs is None else self.outputs.metric_rows()

    def _written_at(self) -> list[float]:
        """When the rows were last written: a restart's set-up begins no earlier than the last lost epoch."""
        if not self._written:
            return []
        return [self.outputs.fs.get_file_info(self.outputs.path(RunDir.METRICS)).mtime.timestamp()]

    def resume_from(self, meta: dict[str, Any], best_student: dict[str, Any] | None = None) -> None:
        """Continue after the engine was restored from a checkpoint with this meta: this run's own rows
        up to the checkpoint's epoch are kept; later ones were lost with the process and are re-run. The
        best student is the checkpoint's (``best_student``), never one of the lost epochs."""
        self.history = [r for r in self._written if r["epoch"] <= meta["epoch"]]
        self._lost = [r for r in self._written if r["epoch"] > meta["epoch"]]
        self.best = meta["best"]
        self._best_student = best_student
        if best_student is not None:
            self._write_best_files()
        self.health.load_state(meta.get("health", {}))
        self._wall_before = meta["wall_s"]

    def _charges(self) -> dict[str, Any]:
        """What the next row carries beyond its own epoch: the lost epochs' work (their own charges
        included) and this start's set-up, less its wait for resources, which it records, once."""
        if self._setup_from is None:
            return {"lost_images": 0, "overhead_s": 0.0, "queued_s": 0.0}
        setup_s = max(0.0, time.time() - self._setup_from - self._queued_s) * self.identity.workers
        charges = {
            "lost_images": charged_images(self._lost),
            "overhead_s": charged_device_s(self._lost) + setup_s,
            "queued_s": self._queued_s,
        }
        self._setup_from, self._lost = None, []
        return charges

    def last_score(self) -> float | None:
        return latest(self.history, self.selection)

    @property
    def cfg(self) -> Config:
        return self.engine.cfg

    @property
    def done(self) -> bool:
        return self.engine.epoch >= self.cfg.train.epochs

    def wall_s(self) -> float:
        return self._wall_before + time.perf_counter() - self._started

    def meta(self) -> dict[str, Any]:
        return {
            "epoch": self.engine.epoch,
            "config": self.cfg.model_dump(),
            "identity": self.identity.columns(),
            "best": self.best,
            "health": self.health.state(),
            "wall_s": self.wall_s(),
        }

    def run_epoch(self) -> dict[str, Any]:
        """Train and (when due) evaluate one epoch; rank 0 writes the row and the best student."""
        charges = self._charges()
        try:
            train_metrics = self.engine.train_epoch()
        except DivergenceError:
            engine = self.engine
            self._record(
                {
                    **self.identity.columns(),
                    **engine.last_epoch_cost,
                    "epoch": engine.epoch,
                    "images": engine.images_synthesized,
                    "device_s": engine.device_seconds,
                    "wall_s": self.wall_s(),
                    "diverged": True,
                    **charges,
                }
            )
            raise
        epoch = self.engine.epoch
        due = epoch % self.cfg.eval.every == 0 or self.done
        measured = self.engine.evaluate() if due else {}
        row = {**self.identity.columns(), **train_metrics, **charges, "wall_s": self.wall_s(), "diverged": False}
        row.update({metric: measured.get(name) for name, metric in METRIC_OF_SET.items()})
        selection_set = next((name for name, metric in METRIC_OF_SET.items() if metric == self.selection), None)
        row["class_coverage"] = measured.get(f"{selection_set}_coverage")
        self._record(row)
        if self.outputs is not None:  # rank 0 speaks for the run
            self.health.observe(row)
            if self.done:  # here, not in finish(): tuning trials end without it
                self.outputs.write_bytes(RunDir.SAMPLES, sample_grid_png(self.engine, self.identity))
        if (
            self.selection
            and row[self.selection] is not None
            and (self.best["value"] is None or row[self.selection] > self.best["value"])
        ):
            self.best = Selection(metric=self.selection, value=row[self.selection], epoch=epoch)
            self._write_best()
        return row

    def _record(self, row: dict[str, Any]) -> None:
        row = {**row, **config_row(self.cfg), **versions()}
        self.history = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]
        if self.outputs is not None:
            self.outputs.write_parquet(RunDir.METRICS, epoch_table(self.history))
        if self.scalars is not None:
            self.scalars.write(row)

    def _write_best(self) -> None:
        if self.outputs is None or not self.keep_best:
            return
        self._best_student = {
            k: v.detach().cpu().contiguous().clone() for k, v in self.engine.student.state_dict().items()
        }
        self._write_best_files()

    def _write_best_files(self) -> None:
        if self.outputs is None or not self.keep_best:
            return
        self.outputs.write_bytes(RunDir.BEST_WEIGHTS, save(self._best_student))
        self.outputs.write_json(RunDir.BEST_CARD, self.student_card(self.best))

    def student_card(self, chosen: dict[str, Any]) -> dict[str, Any]:
        spec = self.engine.spec
        return {
            "arch": self.cfg.student.arch,
            "kwargs": self.cfg.student.kwargs,
            "num_classes": spec.num_classes,
            "input_size": spec.image_size,
            "channels": spec.channels,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "dataset": self.identity.dataset,
            "teacher": self.identity.teacher,
            "selected_by": chosen,
            "builder": "cpsc_ray.method.models:build_model (or any CIFAR-style implementation of the same arch)",
        }

    def checkpoint_files(self) -> dict[str, bytes]:
        return checkpoint_files(self.engine, self.meta(), self._best_student)

    def write_last_checkpoint(self) -> None:
        if self.outputs is not None:
            write_last_checkpoint(self.outputs, self.checkpoint_files())

    def finish(self) -> RunSummary:
        """Summary and config; returns the summary."""
        last = self.history[-1] if self.history else {}
        evaluated = [r for r in self.history if r.get("test_acc") is not None]
        best_row = next((r for r in evaluated if r["epoch"] == self.best["epoch"]), None)
        summary = RunSummary(
            run=self.identity.experiment,
            epochs=self.engine.epoch,
            teacher_test_acc=self.identity.teacher_test_acc,
            selected_by=self.best,
            best={m: best_row.get(m) for m in EVAL_METRICS} if best_row else None,
            last={m: last.get(m) for m in EVAL_METRICS},
            images=self.engine.images_synthesized,
            device_s=self.engine.device_seconds,
            wall_s=self.wall_s(),
            warnings=self.health.warnings,
        )
        if self.outputs is not None:
            self.outputs.write_json(RunDir.SUMMARY, summary)
            self.outputs.write_text(RunDir.CONFIG, to_yaml(self.cfg))
        if self.scalars is not None:
            self.scalars.close()
        return summary
