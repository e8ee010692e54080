"""A distillation run around the engine: evaluation, model selection without the test set, per-epoch
metrics in Parquet, checkpoints and the sample grid. No Ray here: the in-process CLI and each Ray
worker drive the same ``DistillRun``; only rank 0 writes.

Run directory::

    config.yaml         the full config the run used
    metrics.parquet     one row per epoch (results.SCHEMA)
    checkpoints/last/   state.pt (engine.state_dict()) + meta.json, every train.checkpoint_every epochs
    best/               student.safetensors + student.json: the student at the best selection metric
    samples.png         synthetic samples, one row per class
    summary.json        teacher and student accuracy, best and last
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torchvision.utils import make_grid, save_image

from cpsc_ray.config import ConfigError, RunConfig, to_yaml
from cpsc_ray.method.engine import DistillEngine, DivergenceError
from cpsc_ray.runs.evaluation import METRIC_OF_SET
from cpsc_ray.runs.health import HealthMonitor
from cpsc_ray.results.records import EVAL_METRICS, config_row, epoch_table, latest, versions
from cpsc_ray.storage import Storage

STATE_FILE = "state.pt"
META_FILE = "meta.json"
LAST = "checkpoints/last"


def checkpoint_files(engine: DistillEngine, meta: dict[str, Any]) -> dict[str, bytes]:
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    return {STATE_FILE: buffer.getvalue(), META_FILE: json.dumps(meta, indent=2, default=str).encode()}


def write_checkpoint_dir(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be restored; the message names the file and what is wrong."""


def read_checkpoint(storage: Storage, relative: str = "") -> tuple[dict, dict]:
    """(engine state, meta) of a checkpoint directory, loaded with ``weights_only=True``."""
    where = storage.uri(relative) if relative else storage.uri()
    for name in (STATE_FILE, META_FILE):
        if not storage.exists(f"{relative}/{name}" if relative else name):
            raise CheckpointError(f"checkpoint {where}: {name} is missing; is this a cpsc-ray checkpoint directory?")
    try:
        meta = json.loads(storage.read_text(f"{relative}/{META_FILE}" if relative else META_FILE))
        state = torch.load(
            io.BytesIO(storage.read_bytes(f"{relative}/{STATE_FILE}" if relative else STATE_FILE)),
            map_location="cpu",
            weights_only=True,
        )
    except Exception as err:  # noqa: BLE001 - torch and json raise many types for a damaged file
        raise CheckpointError(f"checkpoint {where}: cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "student" not in state or "epoch" not in meta:
        raise CheckpointError(f"checkpoint {where}: not an engine state (no student weights or epoch)")
    return state, meta


def restore_engine(engine: DistillEngine, state: dict, where: str) -> None:
    try:
        engine.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"checkpoint {where}: does not fit this run's models ({first})") from None


def sample_grid_png(engine: DistillEngine) -> bytes:
    classes = engine.spec.num_classes
    per_class = 8 if classes <= 20 else 4
    images, labels = engine.sample(per_class)
    shown = labels < 50  # a grid of 200 classes helps nobody
    buffer = io.BytesIO()
    save_image(make_grid(images[shown], nrow=per_class, padding=1, pad_value=1.0), buffer, format="png")
    return buffer.getvalue()


class DistillRun:
    def __init__(
        self,
        engine: DistillEngine,
        identity: dict[str, Any],
        outputs: Storage | None,
        selection: str | None,
        keep_best: bool = True,
    ):
        self.engine = engine
        self.identity = {**identity, "selection": selection}
        self.outputs = outputs  # None on ranks other than 0
        self.selection = selection
        self.keep_best = keep_best  # tuning trials skip it: `finalize` reruns the chosen config instead
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"metric": selection, "value": None, "epoch": None}
        self.health = HealthMonitor(engine.cfg, engine.spec.num_classes, selection)
        self._wall_before = 0.0
        self._started = time.perf_counter()

    def resume_from(self, meta: dict[str, Any]) -> None:
        """Continue after the engine was restored from a checkpoint with this meta: this run's own rows
        up to the checkpoint's epoch are kept; later ones were lost with the process and are re-run."""
        if self.outputs is not None and self.outputs.exists("metrics.parquet"):
            rows = self.outputs.read_parquet("metrics.parquet").to_pylist()
            self.history = [r for r in rows if r["epoch"] <= meta["epoch"]]
        self.best = meta["best"]
        self.health.load_state(meta.get("health", {}))
        self._wall_before = meta["wall_s"]

    def last_score(self) -> float | None:
        return latest(self.history, self.selection)

    @property
    def cfg(self) -> RunConfig:
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
            "identity": self.identity,
            "best": self.best,
            "health": self.health.state(),
            "wall_s": self.wall_s(),
        }

    def checkpoint_due(self) -> bool:
        return self.done or self.engine.epoch % self.cfg.train.checkpoint_every == 0

    def run_epoch(self) -> dict[str, Any]:
        """Train and (when due) evaluate one epoch; rank 0 writes the row and the best student."""
        try:
            train_metrics = self.engine.train_epoch()
        except DivergenceError:
            engine = self.engine
            self._record(
                {
                    **self.identity,
                    **engine.last_epoch_cost,
                    "epoch": engine.epoch,
                    "images": engine.images_synthesized,
                    "device_s": engine.device_seconds,
                    "wall_s": self.wall_s(),
                    "diverged": True,
                }
            )
            raise
        epoch = self.engine.epoch
        due = epoch % self.cfg.eval.every == 0 or self.done
        measured = self.engine.evaluate() if due else {}
        row = {**self.identity, **train_metrics, "wall_s": self.wall_s(), "diverged": False}
        row.update({metric: measured.get(name) for name, metric in METRIC_OF_SET.items()})
        selection_set = next((name for name, metric in METRIC_OF_SET.items() if metric == self.selection), None)
        row["class_coverage"] = measured.get(f"{selection_set}_coverage")
        self._record(row)
        if self.outputs is not None:  # rank 0 speaks for the run
            self.health.observe(row)
        if (
            self.selection
            and row[self.selection] is not None
            and (self.best["value"] is None or row[self.selection] > self.best["value"])
        ):
            self.best = {"metric": self.selection, "value": row[self.selection], "epoch": epoch}
            self._write_best()
        return row

    def _record(self, row: dict[str, Any]) -> None:
        row = {**row, **config_row(self.cfg), **versions()}
        self.history = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]
        if self.outputs is not None:
            self.outputs.write_parquet("metrics.parquet", epoch_table(self.history))

    def _write_best(self) -> None:
        if self.outputs is None or not self.keep_best:
            return
        weights = {k: v.detach().cpu().contiguous() for k, v in self.engine.student.state_dict().items()}
        self.outputs.write_bytes("best/student.safetensors", save(weights))
        self.outputs.write_json("best/student.json", self.student_card(self.best))

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
            "dataset": self.identity.get("dataset"),
            "teacher": self.identity.get("teacher"),
            "selected_by": chosen,
            "builder": "cpsc_ray.method.models:build_model (or any CIFAR-style implementation of the same arch)",
        }

    def write_last_checkpoint(self) -> None:
        if self.outputs is None:
            return
        for name, data in checkpoint_files(self.engine, self.meta()).items():
            self.outputs.write_bytes(f"{LAST}/{name}", data)

    def finish(self) -> dict[str, Any]:
        """Sample grid and summary; returns the summary."""
        last = self.history[-1] if self.history else {}
        evaluated = [r for r in self.history if r.get("test_acc") is not None]
        best_row = next((r for r in evaluated if r["epoch"] == self.best["epoch"]), None)
        summary = {
            "run": self.identity.get("experiment"),
            "epochs": self.engine.epoch,
            "teacher_test_acc": self.identity.get("teacher_test_acc"),
            "selected_by": self.best,
            "best": {m: best_row.get(m) for m in EVAL_METRICS} if best_row else None,
            "last": {m: last.get(m) for m in EVAL_METRICS},
            "images": self.engine.images_synthesized,
            "device_s": self.engine.device_seconds,
            "wall_s": self.wall_s(),
            "warnings": self.health.warnings,
        }
        if self.outputs is not None:
            self.outputs.write_bytes("samples.png", sample_grid_png(self.engine))
            self.outputs.write_json("summary.json", summary)
            self.outputs.write_text("config.yaml", to_yaml(self.cfg))
        return summary


def state_digest(state: dict) -> str:
    """A hash of the learned state (weights and optimizer moments; not hyperparameters), so two
    states can be compared without holding both."""
    digest = hashlib.sha256()

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(prefix.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                add(f"{prefix}.{key}", value[key])

    for part in ("student", "generator", "head"):
        add(part, state[part])
    for part in ("student_opt", "generator_opt"):
        add(part, state[part]["state"])
    return digest.hexdigest()


def record_exploit(outputs: Storage, engine: DistillEngine, exploit: dict[str, Any]) -> None:
    """PBT lineage: which trial this one cloned, at which epoch, the configs before and after, and
    what is in effect right after the restore (state digest, learning rates, loss weights)."""
    lineage = outputs.read_json("lineage.json") if outputs.exists("lineage.json") else []
    lineage.append(
        {
            **exploit,
            "state_digest": state_digest(engine.state_dict()),
            "lr_student": engine.student_opt.param_groups[0]["lr"],
            "lr_generator": engine.generator_opt.param_groups[0]["lr"],
            "loss_weights": {
                "generator": engine.generator_loss.weights,
                "student": engine.student_loss.weights,
                "temperature": engine.cfg.loss.temperature,
            },
        }
    )
    outputs.write_json("lineage.json", lineage)
