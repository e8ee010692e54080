"""The Parquet schema every run and trial writes: one row per epoch, the same columns always.

Every key of the typed run config is a ``config/<dotted.key>`` column whatever was searched, so
experiments with different search spaces concatenate without schema drift. Beside the epochs: one
row per trial, and the lineage of PBT's exploits.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
from pydantic import BaseModel

import cpsc_ray
from cpsc_ray.config import Config, LossConfig, flatten
from cpsc_ray.layout import ResultsDir
from cpsc_ray.method.metric_names import CONTROL_METRICS, LOSS_METRICS, SYNTHESIS_METRICS, TERM_GRADIENT_METRICS

IDENTITY = {
    "experiment": pa.string(),
    "kind": pa.string(),  # distill | tune | finalize
    "method": pa.string(),  # defaults | manual | <search>+<scheduler> | pbt | pb2 (finalize: the source's)
    "trial_id": pa.string(),
    "selection": pa.string(),  # the metric that picks "best": val_acc or proxy, never test_acc
    "dataset": pa.string(),
    "teacher": pa.string(),
    "student": pa.string(),
    "seed": pa.int64(),
    "teacher_test_acc": pa.float64(),
    "workers": pa.int64(),
    "device": pa.string(),
    "source_experiment": pa.string(),  # finalize: the tuning experiment it reran; null for other kinds
}
PROGRESS = {
    "epoch": pa.int64(),
    "images": pa.int64(),  # synthesized over the state's history (a PBT clone inherits its source's)
    "epoch_images": pa.int64(),  # synthesized in this epoch by this trial
    "lost_images": pa.int64(),  # synthesized in epochs a restart lost (and ran again), charged to the epoch after it
    "images_per_s": pa.float64(),
    "epoch_s": pa.float64(),
    "wall_s": pa.float64(),
    "device_s": pa.float64(),
    # Device-seconds beyond this epoch's own: the set-up of a start (or round, or restart) and the epochs
    # it lost, times the workers; charged to the first epoch after it.
    "overhead_s": pa.float64(),
    # Seconds that start waited for its worker group's resources (other jobs, nodes still booting), on the same
    # row: no device worked for the run then, so no device-seconds are charged for it.
    "queued_s": pa.float64(),
    "lr_student": pa.float64(),
    "lr_generator": pa.float64(),
    **{name: pa.float64() for name in LOSS_METRICS + SYNTHESIS_METRICS + CONTROL_METRICS + TERM_GRADIENT_METRICS},
    "class_coverage": pa.float64(),  # fraction of classes the student predicts on the selection set
    "val_acc": pa.float64(),
    "proxy": pa.float64(),
    "test_acc": pa.float64(),
    "diverged": pa.bool_(),
}
PAIR = ["dataset", "teacher", "student"]  # the identity columns a comparison is made within
VERSIONS = {"cpsc_ray_version": pa.string(), "torch_version": pa.string(), "ray_version": pa.string()}
EVAL_METRICS = ("val_acc", "proxy", "test_acc")
# A student that predicts fewer than this fraction of the classes on a class-balanced set has collapsed:
# runs.health warns of it, the report shades those epochs.
MIN_COVERAGE = 0.5
RUN_KEYS = {"name", "seed", "output_dir"}  # config keys that name a run and where it writes, not what it trains

# Runs at the shipped loss settings (every field of the loss section) are labelled "defaults" in the results
# and reports.
DEFAULT_LOSS = LossConfig().model_dump()


def _arrow_type(annotation: Any) -> pa.DataType:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _arrow_type(args[0])
    if origin is Literal or annotation is str:
        return pa.string()
    if annotation is bool:
        return pa.bool_()
    if annotation is int:
        return pa.int64()
    if annotation is float:
        return pa.float64()
    return pa.string()  # lists and mappings are stored as JSON text


def config_columns() -> dict[str, pa.DataType]:
    columns: dict[str, pa.DataType] = {}

    def walk(prefix: str, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(f"{key}.", field.annotation)
            else:
                columns[f"config/{key}"] = _arrow_type(field.annotation)

    walk("", Config)
    return columns


SCHEMA = pa.schema([pa.field(n, t) for n, t in {**IDENTITY, **PROGRESS, **config_columns(), **VERSIONS}.items()])


def method_label(cfg: Config) -> str:
    return "defaults" if cfg.loss.model_dump() == DEFAULT_LOSS else "manual"


def versions() -> dict[str, str | None]:
    """Versions that made a row, none of them imported here. The torch that computed the row is the one
    this process has loaded (its version keeps the build tag, e.g. ``+cu130``); Ray's is read from its
    metadata: an in-process run needs no Ray (none on a GPU machine without it, where the GPU check runs)."""
    try:
        ray_version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray_version = None
    return {
        "cpsc_ray_version": cpsc_ray.__version__,
        "torch_version": getattr(sys.modules.get("torch"), "__version__", None),
        "ray_version": ray_version,
    }


def config_row(cfg: Config) -> dict[str, Any]:
    """A config as ``config/<dotted key>`` columns; lists and dicts as JSON text (``config_values`` reverses it)."""
    row = {}
    for key, value in flatten(cfg).items():
        row[f"config/{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return row


def plain(value: Any) -> Any:
    """A Parquet cell as a plain Python value: missing (None, NaN) -> None, JSON text -> list or dict."""
    if isinstance(value, str):
        return json.loads(value) if value[:1] in "[{" else value
    if value is None or (not isinstance(value, (list, dict)) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def config_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted config values of a results row (a dict or a pandas row): ``config_row`` reversed."""
    return {c.removeprefix("config/"): plain(v) for c, v in row.items() if c.startswith("config/")}


def epoch_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) to a table of exactly SCHEMA; a missing column is null, an unknown one an error."""
    unknown = set().union(*(r.keys() for r in rows)) - set(SCHEMA.names) if rows else set()
    if unknown:
        raise ValueError(f"columns not in the results schema: {sorted(unknown)}")
    return pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)


# ----- experiment tables -----------------------------------------------------------------------------
TRIAL_SUMMARY = {
    **IDENTITY,
    "score": pa.float64(),  # best value of the selection metric: what tuning maximised
    "best_epoch": pa.int64(),
    "epochs": pa.int64(),
    "images": pa.int64(),  # synthesized by this trial itself (not what a PBT clone inherited), re-runs included
    "device_s": pa.float64(),  # spent by this trial itself: its epochs' seconds times its workers, set-up included
    "queued_s": pa.float64(),  # seconds its starts waited for resources, not in device_s
    "wall_s": pa.float64(),
    "diverged": pa.bool_(),
    "best_val_acc": pa.float64(),
    "last_val_acc": pa.float64(),
    "best_proxy": pa.float64(),
    "last_proxy": pa.float64(),
    "test_at_best": pa.float64(),  # test accuracy at best_epoch: measured, never used to choose
    "last_test_acc": pa.float64(),
}
TRIALS_SCHEMA = pa.schema([pa.field(n, t) for n, t in {**TRIAL_SUMMARY, **config_columns(), **VERSIONS}.items()])
LINEAGE_SCHEMA = pa.schema(
    [
        ("experiment", pa.string()),
        ("dataset", pa.string()),
        ("trial_id", pa.string()),
        ("source_trial_id", pa.string()),
        ("epoch", pa.int64()),
        ("source_checkpoint", pa.string()),
        ("state_digest", pa.string()),
        ("lr_student", pa.float64()),
        ("lr_generator", pa.float64()),
        ("loss_weights", pa.string()),
        ("config_before", pa.string()),
        ("config_after", pa.string()),
    ]
)
TABLES = {ResultsDir.EPOCHS: SCHEMA, ResultsDir.TRIALS: TRIALS_SCHEMA, ResultsDir.LINEAGE: LINEAGE_SCHEMA}
