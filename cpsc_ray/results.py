"""The Parquet schema every run and trial writes: one row per epoch, the same columns always.

Every key of the typed run config is a ``config/<dotted.key>`` column whatever was searched, so
experiments with different search spaces concatenate without schema drift.
"""

from __future__ import annotations

import importlib.metadata
import json
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

import cpsc_ray
from cpsc_ray.config import LossConfig, RunConfig, flatten
from cpsc_ray.engine import LOSS_METRICS, SYNTHESIS_METRICS, TERM_GRADIENT_METRICS
from cpsc_ray.storage import Storage

if TYPE_CHECKING:
    import pandas as pd

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
}
PROGRESS = {
    "epoch": pa.int64(),
    "images": pa.int64(),  # synthesized over the state's history (a PBT clone inherits its source's)
    "epoch_images": pa.int64(),  # synthesized in this epoch by this trial: sum these for compute totals
    "images_per_s": pa.float64(),
    "epoch_s": pa.float64(),
    "wall_s": pa.float64(),
    "device_s": pa.float64(),
    "lr_student": pa.float64(),
    "lr_generator": pa.float64(),
    **{name: pa.float64() for name in LOSS_METRICS + SYNTHESIS_METRICS + TERM_GRADIENT_METRICS},
    "class_coverage": pa.float64(),  # fraction of classes the student predicts on the selection set
    "val_acc": pa.float64(),
    "proxy": pa.float64(),
    "test_acc": pa.float64(),
    "diverged": pa.bool_(),
}
VERSIONS = {"cpsc_ray_version": pa.string(), "torch_version": pa.string(), "ray_version": pa.string()}
EVAL_METRICS = ("val_acc", "proxy", "test_acc")

# Runs at the shipped loss weights are labelled "defaults" in the results and reports.
DEFAULT_WEIGHTS = LossConfig().model_dump(include={"alpha", "beta", "gamma", "eta", "temperature"})


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

    walk("", RunConfig)
    return columns


SCHEMA = pa.schema([pa.field(n, t) for n, t in {**IDENTITY, **PROGRESS, **config_columns(), **VERSIONS}.items()])


def method_label(cfg: RunConfig) -> str:
    weights = cfg.loss.model_dump(include=set(DEFAULT_WEIGHTS))
    return "defaults" if weights == DEFAULT_WEIGHTS else "manual"


def versions() -> dict[str, str | None]:
    """Versions that made a row. Ray's is read from its metadata: an in-process run needs no Ray (none on
    a GPU machine without it, where the GPU check runs)."""
    import torch

    try:
        ray_version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray_version = None
    return {
        "cpsc_ray_version": cpsc_ray.__version__,
        "torch_version": torch.__version__,
        "ray_version": ray_version,
    }


def config_row(cfg: RunConfig) -> dict[str, Any]:
    row = {}
    for key, value in flatten(cfg).items():
        row[f"config/{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return row


def epoch_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) to a table of exactly SCHEMA; a missing column is null, an unknown one an error."""
    unknown = set().union(*(r.keys() for r in rows)) - set(SCHEMA.names) if rows else set()
    if unknown:
        raise ValueError(f"columns not in the results schema: {sorted(unknown)}")
    return pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)


# ----- experiment tables -----------------------------------------------------------------------------
TRIAL_SUMMARY = {
    **{k: v for k, v in IDENTITY.items()},
    "score": pa.float64(),  # best value of the selection metric: what tuning maximised
    "best_epoch": pa.int64(),
    "epochs": pa.int64(),
    "images": pa.int64(),  # synthesized by this trial itself (not what a PBT clone inherited)
    "device_s": pa.float64(),  # spent by this trial itself: its epochs' seconds times its workers
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
TABLES = {"epochs": SCHEMA, "trials": TRIALS_SCHEMA, "lineage": LINEAGE_SCHEMA}
PARTITIONS = ("dataset", "experiment")


def best_trial(trials: "pd.DataFrame") -> "pd.Series | None":
    """The trial an experiment selected: the best selection metric among non-diverged trials (what
    finalize reruns and the report names); None when no trial finished with a score."""
    eligible = trials[~trials.diverged.astype(bool) & trials.score.notna()]
    return None if eligible.empty else eligible.loc[eligible.score.idxmax()]


def summarize_trial(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per trial: best and last validation, proxy and test accuracy, and compute spent."""
    rows = sorted(rows, key=lambda r: r["epoch"])
    last = rows[-1]
    selection = last["selection"]
    measured = [r for r in rows if selection and r.get(selection) is not None]
    best = max(measured, key=lambda r: r[selection]) if measured else None

    def extreme(metric: str) -> float | None:
        values = [r[metric] for r in rows if r.get(metric) is not None]
        return max(values) if values else None

    def latest(metric: str) -> float | None:
        return next((r[metric] for r in reversed(rows) if r.get(metric) is not None), None)

    summary = {k: last.get(k) for k in IDENTITY}
    summary.update(
        score=best[selection] if best else None,
        best_epoch=best["epoch"] if best else None,
        epochs=last["epoch"],
        images=sum(r.get("epoch_images") or 0 for r in rows),
        device_s=sum((r.get("epoch_s") or 0.0) * (r.get("workers") or 1) for r in rows),
        wall_s=last.get("wall_s"),
        diverged=any(bool(r.get("diverged")) for r in rows),
        best_val_acc=extreme("val_acc"),
        last_val_acc=latest("val_acc"),
        best_proxy=extreme("proxy"),
        last_proxy=latest("proxy"),
        test_at_best=best.get("test_acc") if best else None,
        last_test_acc=latest("test_acc"),
    )
    summary.update({k: v for k, v in last.items() if k.startswith("config/") or k in VERSIONS})
    return summary


def lineage_rows(experiment: str, dataset: str, trial_id: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "experiment": experiment,
            "dataset": dataset,
            "trial_id": trial_id,
            "source_trial_id": r["source_trial_id"],
            "epoch": r["epoch"],
            "source_checkpoint": r["source_checkpoint"],
            "state_digest": r["state_digest"],
            "lr_student": r["lr_student"],
            "lr_generator": r["lr_generator"],
            "loss_weights": json.dumps(r["loss_weights"]),
            "config_before": json.dumps(r["config_before"]),
            "config_after": json.dumps(r["config_after"]),
        }
        for r in records
    ]


def publish(root: Storage, experiment: str, epochs: list[dict[str, Any]], lineage: list[dict[str, Any]]) -> None:
    """Write an experiment's (or a run's) tables into ``<root>/results/<table>/dataset=../experiment=../``,
    each partition file atomically; a rerun replaces that experiment's partitions."""
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for row in epochs:
        by_trial.setdefault(row["trial_id"], []).append(row)
    tables = {
        "epochs": epoch_table(epochs),
        "trials": pa.Table.from_pylist([summarize_trial(r) for r in by_trial.values()], schema=TRIALS_SCHEMA),
        "lineage": pa.Table.from_pylist(lineage, schema=LINEAGE_SCHEMA),
    }
    for name, table in tables.items():
        for dataset in sorted(set(table.column("dataset").to_pylist())):
            part = table.filter(pc.equal(table["dataset"], dataset)).drop_columns(list(PARTITIONS))
            root.write_parquet(f"results/{name}/dataset={dataset}/experiment={experiment}/part-0.parquet", part)


def collect_experiment(root: Storage, experiment: str) -> dict[str, Any]:
    """Gather every trial's rows and lineage of a tuning experiment into the results tables."""
    trials = root.child(experiment, "cpsc", "trials")
    epochs, lineage = [], []
    for trial_id in trials.list_dirs():
        if not trials.exists(f"{trial_id}/metrics.parquet"):
            continue  # a trial that never finished an epoch
        rows = trials.read_parquet(f"{trial_id}/metrics.parquet").to_pylist()
        epochs.extend(rows)
        if trials.exists(f"{trial_id}/lineage.json"):
            lineage.extend(
                lineage_rows(experiment, rows[0]["dataset"], trial_id, trials.read_json(f"{trial_id}/lineage.json"))
            )
    if not epochs:
        raise ValueError(f"experiment {experiment}: no trial finished an epoch; nothing to collect")
    publish(root, experiment, epochs, lineage)
    summaries = sorted(
        (summarize_trial([r for r in epochs if r["trial_id"] == t]) for t in {r["trial_id"] for r in epochs}),
        key=lambda r: -1 if r["score"] is None else r["score"],
        reverse=True,
    )
    return {"experiment": experiment, "results": root.uri("results"), "trials": summaries}


class ResultsError(ValueError):
    """Results that cannot be read; the message names the path and what was expected."""


@dataclass
class Results:
    epochs: "pd.DataFrame"
    trials: "pd.DataFrame"
    lineage: "pd.DataFrame"


def _read_table(location: str, name: str, experiments: list[str] | None) -> "pd.DataFrame":
    import pyarrow.dataset as ds

    storage = Storage(location)
    if not storage.exists(name):
        return TABLES[name].empty_table().to_pandas()
    partitioning = ds.partitioning(pa.schema([(p, pa.string()) for p in PARTITIONS]), flavor="hive")
    expected = pa.schema([f for f in TABLES[name] if f.name not in PARTITIONS])
    files = ds.dataset(storage.path(name), filesystem=storage.fs, format="parquet", partitioning=partitioning)
    for fragment in files.get_fragments():
        # Tables of earlier versions lack the columns added since: those read as nulls. Columns this
        # version does not know, or of another type, mean it is not a cpsc-ray table it can read.
        schema = fragment.physical_schema
        unknown = sorted(set(schema.names) - set(expected.names))
        retyped = sorted(
            n for n in schema.names if n in expected.names and schema.field(n).type != expected.field(n).type
        )
        if unknown or retyped:
            raise ResultsError(
                f"{fragment.path}: not a cpsc-ray {name} table of this version (unknown columns: {unknown[:5]}, "
                f"other types: {retyped[:5]}); rewrite it with this cpsc-ray or point at another results directory"
            )
    table = ds.dataset(
        storage.path(name),
        filesystem=storage.fs,
        format="parquet",
        partitioning=partitioning,
        schema=pa.unify_schemas([expected, partitioning.schema]),
    ).to_table()
    if experiments:
        table = table.filter(pc.is_in(table["experiment"], pa.array(experiments)))
    return table.to_pandas()


def read_results(locations: list[str], experiments: list[str] | None = None) -> Results:
    """Read the results tables under each location (a ``results`` directory, or a storage root or run
    directory holding one); local paths or URIs."""
    import pandas as pd

    frames: dict[str, list] = {name: [] for name in TABLES}
    for location in locations:
        base = Storage(location)
        root = base if base.exists("epochs") else base.child("results")
        if not root.exists("epochs"):
            raise ResultsError(
                f"{location}: no cpsc-ray results here (expected results/epochs/dataset=.../experiment=.../*.parquet "
                "under a run's storage); give the --storage or output_dir a run or experiment wrote to"
            )
        for name in TABLES:
            frames[name].append(_read_table(root.uri(), name, experiments))
    return Results(*(pd.concat(frames[name], ignore_index=True) for name in ("epochs", "trials", "lineage")))
