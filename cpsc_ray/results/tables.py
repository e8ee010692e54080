"""Publishing and reading the results tables: ``<root>/results/<table>/dataset=../experiment=../``,
with one row per trial summarised from its epochs when it is published."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from cpsc_ray.compat import finalize_source_by_name
from cpsc_ray.errors import InputError, RunFailed
from cpsc_ray.layout import ResultsDir, RootDir, RunDir
from cpsc_ray.results.lineage import read_lineage
from cpsc_ray.results.schema import (
    IDENTITY,
    LINEAGE_SCHEMA,
    PAIR,
    TABLES,
    TRIALS_SCHEMA,
    VERSIONS,
    epoch_table,
)
from cpsc_ray.storage import Storage

READ_THREADS = 16  # results files read at once: an object store answers each after a round trip


def latest(rows: Iterable[Mapping[str, Any]], metric: str) -> Any:
    """The last non-null value of ``metric`` in rows given in epoch order, or None."""
    return next((r[metric] for r in reversed(list(rows)) if r.get(metric) is not None), None)


def best_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The trial an experiment selected: the best selection metric among non-diverged trials (what
    finalize reruns and the report names); None when no trial finished with a score."""
    eligible = trials[~trials.diverged.astype(bool) & trials.score.notna()]
    return None if eligible.empty else eligible.loc[eligible.score.idxmax()]


def charged_images(rows: list[dict[str, Any]]) -> int:
    """The images these rows account for: their own epochs' and those of lost epochs charged to them."""
    return sum((r.get("epoch_images") or 0) + (r.get("lost_images") or 0) for r in rows)


def charged_device_s(rows: list[dict[str, Any]]) -> float:
    """The device-seconds these rows account for: their epochs' seconds times the workers, plus the
    set-up and lost epochs charged to them."""
    return sum((r.get("epoch_s") or 0.0) * (r.get("workers") or 1) + (r.get("overhead_s") or 0.0) for r in rows)


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

    summary = {k: last.get(k) for k in IDENTITY}
    summary.update(
        score=best[selection] if best else None,
        best_epoch=best["epoch"] if best else None,
        epochs=last["epoch"],
        images=charged_images(rows),
        device_s=charged_device_s(rows),
        queued_s=sum(r.get("queued_s") or 0.0 for r in rows),
        wall_s=last.get("wall_s"),
        diverged=any(bool(r.get("diverged")) for r in rows),
        best_val_acc=extreme("val_acc"),
        last_val_acc=latest(rows, "val_acc"),
        best_proxy=extreme("proxy"),
        last_proxy=latest(rows, "proxy"),
        test_at_best=best.get("test_acc") if best else None,
        last_test_acc=latest(rows, "test_acc"),
    )
    summary.update({k: v for k, v in last.items() if k.startswith("config/") or k in VERSIONS})
    return summary


def publish(root: Storage, experiment: str, epochs: list[dict[str, Any]], lineage: list[dict[str, Any]]) -> None:
    """Write an experiment's (or a run's) tables into ``<root>/results/<table>/dataset=../experiment=../``,
    each partition file atomically; a rerun replaces that experiment's partitions."""
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for row in epochs:
        by_trial.setdefault(row["trial_id"], []).append(row)
    tables = {
        ResultsDir.EPOCHS: epoch_table(epochs),
        ResultsDir.TRIALS: pa.Table.from_pylist([summarize_trial(r) for r in by_trial.values()], schema=TRIALS_SCHEMA),
        ResultsDir.LINEAGE: pa.Table.from_pylist(lineage, schema=LINEAGE_SCHEMA),
    }
    results = root.child(ResultsDir.NAME)
    for name, table in tables.items():
        for dataset in sorted(set(table.column("dataset").to_pylist())):
            part = table.filter(pc.equal(table["dataset"], dataset)).drop_columns(list(ResultsDir.PARTITIONS))
            results.write_parquet(ResultsDir.part(name, dataset, experiment), part)


class NothingToCollect(RunFailed):
    """A tuning experiment none of whose trials finished an epoch (a failed run, not an input error)."""


def collect_experiment(root: RootDir, experiment: str) -> dict[str, Any]:
    """Gather every trial's rows and lineage of a tuning experiment into the results tables."""
    directory = root.experiment(experiment)
    epochs, lineage = [], []
    for trial_id in directory.trial_ids():
        trial = directory.trial(trial_id)
        rows = trial.metric_rows()
        if not rows:
            continue  # a trial that never finished an epoch
        epochs.extend(rows)
        lineage.extend(clone.row(experiment, rows[0]["dataset"], trial_id) for clone in read_lineage(trial))
    if not epochs:
        raise NothingToCollect(f"experiment {experiment}: no trial finished an epoch; nothing to collect")
    publish(root, experiment, epochs, lineage)
    summaries = sorted(
        (summarize_trial([r for r in epochs if r["trial_id"] == t]) for t in {r["trial_id"] for r in epochs}),
        key=lambda r: -1 if r["score"] is None else r["score"],
        reverse=True,
    )
    return {"experiment": experiment, "results": root.results().uri(), "trials": summaries}


class ResultsError(InputError):
    """Results that cannot be read; the message names the path and what was expected (an input error, as a bad
    config is)."""


@dataclass
class Results:
    epochs: pd.DataFrame
    trials: pd.DataFrame
    lineage: pd.DataFrame
    storage: dict[tuple[str, str], str]  # (dataset, experiment) -> the storage root its run directories are under


def run_name(kind: str, experiment: str, trial_id: str) -> str:
    """A run as reports and sample grids name it: the experiment, and the trial or seed within it."""
    return experiment if kind == "distill" else f"{experiment}/{trial_id}"


def samples_png(results: Results, trial: pd.Series) -> bytes | None:
    """The sample grid a run (a row of the trials table) wrote after its last epoch; None when it has
    none: a run that diverged or was stopped early, or whose storage is not there."""
    root = results.storage.get((trial.dataset, trial.experiment))
    if root is None:
        return None
    run = RootDir(root).run_of(trial.kind, trial.experiment, trial.trial_id)
    return run.read_bytes(RunDir.SAMPLES) if run.exists(RunDir.SAMPLES) else None


def _read_table(location: str, name: str, experiments: list[str] | None) -> pd.DataFrame:
    storage = Storage(location)
    partitioning = ds.partitioning(pa.schema([(p, pa.string()) for p in ResultsDir.PARTITIONS]), flavor="hive")
    expected = pa.schema([f for f in TABLES[name] if f.name not in ResultsDir.PARTITIONS])
    full = pa.unify_schemas([expected, partitioning.schema])
    types = dict(zip(expected.names, expected.types))
    if not storage.exists(name):
        return full.empty_table().to_pandas()
    # Given the schema, the listing opens no file.
    listing = ds.dataset(
        storage.path(name), filesystem=storage.fs, format="parquet", partitioning=partitioning, schema=full
    )
    fragments = [(f.path, ds.get_partition_keys(f.partition_expression)) for f in listing.get_fragments()]
    wanted = [(path, keys) for path, keys in fragments if not experiments or keys.get("experiment") in experiments]
    # Each file read whole (Storage.read_parquet), as a run publishing meanwhile replaces it; several at once,
    # as an object store answers each read after a round trip.
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        tables = list(pool.map(lambda item: storage.read_parquet(posixpath.relpath(item[0], storage.root)), wanted))
    parts = []
    for (path, keys), table in zip(wanted, tables):
        # Tables of earlier versions lack the columns added since: those read as nulls. Columns this
        # version does not know, or of another type, mean it is not a cpsc-ray table it can read.
        unknown = sorted(set(table.column_names) - set(types))
        retyped = sorted(n for n in table.column_names if n in types and table.schema.field(n).type != types[n])
        if unknown or retyped:
            raise ResultsError(
                f"{path}: not a cpsc-ray {name} table of this version (unknown columns: {unknown[:5]}, "
                f"other types: {retyped[:5]}); rewrite it with this cpsc-ray or point at another results directory"
            )
        rows = table.num_rows
        columns = [table[f.name] if f.name in table.column_names else pa.nulls(rows, f.type) for f in expected]
        columns += [pa.array([keys.get(p)] * rows, pa.string()) for p in ResultsDir.PARTITIONS]
        parts.append(pa.Table.from_arrays(columns, schema=full))
    return (pa.concat_tables(parts) if parts else full.empty_table()).to_pandas()


def read_results(locations: list[str], experiments: list[str] | None = None) -> Results:
    """Read the results tables under each location (a ``results`` directory, or a storage root or run
    directory holding one); local paths or URIs."""
    frames: dict[str, list] = {name: [] for name in TABLES}
    storage: dict[tuple[str, str], str] = {}
    for location in locations:
        root = ResultsDir.at(Storage(location))
        if root is None:
            raise ResultsError(
                f"{location}: no cpsc-ray results here (expected {ResultsDir.NAME}/"
                f"{ResultsDir.part(ResultsDir.EPOCHS, '...', '...')} under a run's storage); give the --storage or "
                "output_dir a run or experiment wrote to"
            )
        for name in TABLES:
            frames[name].append(_read_table(root.uri(), name, experiments))
        for key in frames[ResultsDir.TRIALS][-1][["dataset", "experiment"]].drop_duplicates().itertuples(index=False):
            storage[tuple(key)] = Storage.of_file(root.uri())[0].uri()  # the root above results/, query kept
    return _concat(frames, storage)


def read_for_report(locations: list[str], experiments: list[str] | None = None) -> Results:
    """Every location's results, each location once and each experiment from one location only (from two,
    its rows would mix); unreadable Parquet and results without a run are refused."""
    parts: dict[str, list] = {name: [] for name in TABLES}
    storage: dict[tuple[str, str], str] = {}
    seen: dict[tuple[str, str], str] = {}
    unique: dict[str, str] = {}
    for location in locations:
        unique.setdefault(Storage(location).uri(), location)
    for location in unique.values():
        try:
            part = read_results([location], experiments)
        except (pa.ArrowException, OSError) as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise ResultsError(
                f"{location}: cannot read its results Parquet ({reason}); point at the --storage (or its results/ "
                "directory) that cpsc-ray distill, tune or finalize wrote"
            ) from None
        for dataset, experiment in part.trials[["dataset", "experiment"]].drop_duplicates().itertuples(index=False):
            if (dataset, experiment) in seen:
                raise ResultsError(
                    f"experiment {experiment} ({dataset}) is under both {seen[dataset, experiment]} and {location}; "
                    "give each experiment once (drop a location, or choose with --experiments)"
                )
            seen[dataset, experiment] = location
        for name in TABLES:
            parts[name].append(getattr(part, name))
        storage.update(part.storage)
    results = _concat(parts, storage)
    if results.trials.empty:
        chosen = f" for experiments {', '.join(experiments)}" if experiments else ""
        raise ResultsError(
            f"{', '.join(locations)}: no runs in these results{chosen}; run cpsc-ray distill, tune or finalize with "
            "--storage pointing here, or give the location they wrote to"
        )
    return results


def _concat(frames: dict[str, list[pd.DataFrame]], storage: dict[tuple[str, str], str]) -> Results:
    tables = {name: pd.concat(parts, ignore_index=True) for name, parts in frames.items()}
    tables[ResultsDir.TRIALS] = with_finalize_sources(tables[ResultsDir.TRIALS])
    return Results(**tables, storage=storage)


def with_finalize_sources(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials, with the source experiment of finalize reruns published before runs recorded it found by the
    name finalize gave them (``compat``), among the tuning experiments of the same teacher/student pair,
    dataset and method."""
    trials = trials.copy()
    unrecorded = trials[(trials.kind == "finalize") & trials.source_experiment.isna()]
    tuned = trials[trials.kind == "tune"]
    for key, _ in unrecorded.groupby([*PAIR, "method", "experiment"], dropna=False):
        *pair, method, final = key
        alike = tuned[(tuned[PAIR] == pair).all(axis=1) & (tuned.method == method)]
        rows = (trials.kind == "finalize") & (trials.experiment == final) & (trials[PAIR] == pair).all(axis=1)
        trials.loc[rows, "source_experiment"] = finalize_source_by_name(final, list(alike.experiment.unique()))
    return trials
