"""The comparison across runs and datasets: per dataset and teacher/student pair, one row per method
and experiment, what its accuracy rests on and what it cost; and the cross-dataset cells.

What a row's accuracy rests on:
- distill runs: the runs that trained the same config, whatever their seeds, grouped;
- a tuning experiment with a finalize rerun: the rerun's seeds (the latest rerun if there are several);
- a tuning experiment without one: its selected trial alone, marked as a single run.
The selected trial is the one ``finalize`` reruns: the best selection metric (validation accuracy or
the data-free proxy) among non-diverged trials. Test accuracy is reported, never used to choose.
A row's compute sums every trial and seed it ran, early-stopped and diverged ones included.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

from cpsc_ray.results.schema import PAIR, RUN_KEYS, config_values
from cpsc_ray.results.tables import Results, best_trial

TRIAL = ["experiment", "trial_id"]
WEIGHTS = ("loss.alpha", "loss.beta", "loss.gamma", "loss.eta")
ALWAYS_SHOWN = (*WEIGHTS, "loss.temperature")
DEFAULTS = "defaults"
SUMMARY_COLUMNS = [
    *PAIR,
    "method",
    "kind",
    "experiment",
    "final_experiment",
    "selected_trial",
    "accuracy_from",
    "single_run",
    "n",
    "trials",
    "runs",
    "diverged",
    "selection",
    "score_mean",
    "score_std",
    "val_mean",
    "val_std",
    "test_mean",
    "test_std",
    "last_test_mean",
    "last_test_std",
    "device",
    "compute_unit",
    "device_s",
    "search_device_s",
    "device_hours",
    "queued_hours",
    "images",
    "hyperparameters",
]
CROSS_COLUMNS = [
    *PAIR,
    "method",
    "experiment",
    "test_mean",
    "test_std",
    "n",
    "single_run",
    "device_hours",
    "compute_unit",
    "candidates",
]


@dataclass
class Entry:
    """One row of a pair's table and the runs behind it."""

    row: dict[str, Any]
    search: pd.DataFrame  # the trials of a tuning experiment; empty for distill runs
    reruns: pd.DataFrame  # the distill runs, or the seeds of the finalize rerun(s)
    selected: str | None  # the selected trial of a tuning experiment


def summarize(results: Results) -> list[Entry]:
    entries: list[Entry] = []
    for key, trials in results.trials.groupby(PAIR, sort=True, dropna=False):
        identity = dict(zip(PAIR, key))
        epochs = of_pair(results.epochs, identity)
        keys = shown_keys(epochs)
        configs = configs_at_best_epoch(trials, epochs)
        entries += _distill_entries(identity, trials[trials.kind == "distill"], keys)
        entries += _tuned_entries(identity, trials, configs, keys)
    return entries


def of_pair(frame: pd.DataFrame, identity: dict[str, Any]) -> pd.DataFrame:
    """The rows of ``frame`` of one dataset and teacher/student pair (a missing value matches missing)."""
    mask = pd.Series(True, index=frame.index)
    for column, value in identity.items():
        mask &= frame[column].isna() if value is None or value != value else frame[column] == value
    return frame[mask]


def shown_keys(epochs: pd.DataFrame) -> list[str]:
    """The loss weights and temperature, and every other config key whose value differs somewhere in the pair."""
    varying = {
        c.removeprefix("config/")
        for c in epochs.columns
        if c.startswith("config/") and epochs[c].astype(str).nunique() > 1
    }
    return [*ALWAYS_SHOWN, *sorted(varying - set(ALWAYS_SHOWN) - RUN_KEYS)]


def configs_at_best_epoch(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """Each trial's config at its best epoch (a PBT trial's config changes along its run), indexed by trial."""
    chosen = trials[TRIAL].assign(epoch=trials.best_epoch.fillna(trials.epochs).astype("int64"))
    rows = epochs.drop_duplicates([*TRIAL, "epoch"], keep="last")
    config = [c for c in epochs.columns if c.startswith("config/")]
    return chosen.merge(rows[[*TRIAL, "epoch", *config]], on=[*TRIAL, "epoch"], how="left").set_index(TRIAL)


def _distill_entries(identity: dict[str, Any], runs: pd.DataFrame, keys: list[str]) -> Iterator[Entry]:
    signature = pd.Series(
        [
            json.dumps({k: v for k, v in config_values(r).items() if k not in RUN_KEYS}, sort_keys=True, default=str)
            for _, r in runs.iterrows()
        ],
        index=runs.index,
        dtype=object,
    )
    groups = [group for _, group in runs.groupby(signature, sort=False)]
    for group in sorted(groups, key=lambda g: (g.method.iloc[0] != DEFAULTS, sorted(g.experiment))):
        seeds = sorted(group.seed)
        listed = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)}"
        yield Entry(
            _row(
                identity,
                group[~group.diverged.astype(bool)],
                group,
                config_values(group.iloc[0]),
                keys,
                kind="distill",
                method=group.method.iloc[0],
                experiment=", ".join(sorted(group.experiment)),
                accuracy_from=f"distill runs, same config ({listed})",
            ),
            search=group.iloc[0:0],
            reruns=group,
            selected=None,
        )


def _tuned_entries(
    identity: dict[str, Any], trials: pd.DataFrame, configs: pd.DataFrame, keys: list[str]
) -> Iterator[Entry]:
    """A row per tuning experiment, then one per finalize experiment whose tuning experiment is absent."""
    tuned = trials[trials.kind == "tune"]
    finals = trials[trials.kind == "finalize"]
    owner = {final: group.source_experiment.iloc[0] for final, group in finals.groupby("experiment")}
    order = tuned[["method", "experiment"]].drop_duplicates().sort_values(["method", "experiment"])
    for method, experiment in order.itertuples(index=False):
        reruns = sorted(f for f, source in owner.items() if source == experiment)  # timestamped reruns sort later
        yield _search_entry(identity, method, tuned[tuned.experiment == experiment], finals, reruns, configs, keys)
    for final, source in sorted(owner.items()):
        if source not in set(tuned.experiment):
            yield _orphan_rerun_entry(identity, finals[finals.experiment == final], configs, keys)


def _search_entry(
    identity: dict[str, Any],
    method: str,
    search: pd.DataFrame,
    finals: pd.DataFrame,
    reruns: list[str],
    configs: pd.DataFrame,
    keys: list[str],
) -> Entry:
    """A tuning experiment's row: accuracy from its latest finalize rerun, else from its selected trial alone."""
    experiment = search.experiment.iloc[0]
    winner = best_trial(search)
    config = _config(configs, experiment, winner.trial_id) if winner is not None else {}
    spent = pd.concat([search, finals[finals.experiment.isin(reruns)]])
    fields: dict[str, Any] = dict(
        kind="tune",
        method=method,
        experiment=experiment,
        trials=len(search),
        search_device_s=float(search.device_s.sum()),
        selected_trial=None if winner is None else winner.trial_id,
    )
    if reruns:
        latest = finals[finals.experiment == reruns[-1]]
        units = latest[~latest.diverged.astype(bool)]
        fields.update(
            final_experiment=reruns[-1],
            accuracy_from=f"finalize rerun {reruns[-1]}" + (f" (latest of {len(reruns)})" if len(reruns) > 1 else ""),
        )
    elif winner is not None:
        units = search[search.trial_id == winner.trial_id]
        fields.update(accuracy_from=f"selected trial {winner.trial_id}, single run", single_run=True)
    else:
        units = search.iloc[0:0]
        fields.update(accuracy_from="no trial finished with a score")
    return Entry(
        _row(identity, units, spent, config, keys, **fields),
        search=search,
        reruns=finals[finals.experiment.isin(reruns)],
        selected=fields["selected_trial"],
    )


def _orphan_rerun_entry(identity: dict[str, Any], group: pd.DataFrame, configs: pd.DataFrame, keys: list[str]) -> Entry:
    """A finalize experiment whose tuning experiment is not in these results: its seeds alone."""
    final = group.experiment.iloc[0]
    units = group[~group.diverged.astype(bool)]
    config = _config(configs, final, units.trial_id.iloc[0]) if not units.empty else {}
    return Entry(
        _row(
            identity,
            units,
            group,
            config,
            keys,
            kind="finalize",
            method=group.method.iloc[0],
            experiment=final,
            final_experiment=final,
            accuracy_from=f"finalize rerun {final} (its tuning experiment is not in these results)",
        ),
        search=group.iloc[0:0],
        reruns=group,
        selected=None,
    )


def _config(configs: pd.DataFrame, experiment: str, trial_id: str) -> dict[str, Any]:
    return config_values(configs.loc[(experiment, trial_id)])


def _mean_sd(values: pd.Series) -> tuple[float | None, float | None]:
    values = values.dropna().astype(float)
    mean = float(values.mean()) if len(values) else None
    return mean, float(values.std(ddof=1)) if len(values) > 1 else None


def compute_unit(devices: list[str]) -> str:
    if devices == ["cpu"]:
        return "CPU"
    return "GPU" if devices and "cpu" not in devices else "device"


def _row(
    identity: dict[str, Any],
    units: pd.DataFrame,
    spent: pd.DataFrame,
    config: dict[str, Any],
    keys: list[str],
    **fields: Any,
) -> dict[str, Any]:
    """``units``: the runs the accuracy rests on; ``spent``: every run whose compute the row counts."""
    devices = sorted(set(spent.device.dropna()))
    device_s = float(spent.device_s.sum())
    row: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS)
    row.update(identity)
    row.update(
        single_run=False,
        n=len(units),
        runs=len(spent),
        diverged=int(spent.diverged.astype(bool).sum()),
        selection="/".join(sorted(set(spent.selection.dropna()))),
        device=", ".join(devices),
        compute_unit=compute_unit(devices),
        device_s=device_s,
        device_hours=device_s / 3600,
        queued_hours=float(spent.queued_s.fillna(0).sum()) / 3600,
        images=int(spent.images.sum()),
        hyperparameters=json.dumps({k: config.get(k) for k in keys} if config else {}),
    )
    for name, column in (
        ("score", "score"),
        ("val", "best_val_acc"),
        ("test", "test_at_best"),
        ("last_test", "last_test_acc"),
    ):
        row[f"{name}_mean"], row[f"{name}_std"] = _mean_sd(units[column])
    row.update(fields)
    return row


def cross_dataset(summary: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, pair and method (cpsc-ray's defaults or a tuning method) the test accuracy of the
    selected configuration. Among several experiments of one method the best selection metric wins."""
    eligible = summary[((summary.kind != "distill") | (summary.method == DEFAULTS)) & (summary.n > 0)]
    cells = []
    for key, group in eligible.groupby([*PAIR, "method"], sort=True, dropna=False):
        best = group.sort_values(["score_mean", "n"], ascending=False, na_position="last").iloc[0]
        cells.append(
            {
                **dict(zip([*PAIR, "method"], key)),
                **{
                    c: best[c]
                    for c in ("experiment", "test_mean", "test_std", "n", "single_run", "device_hours", "compute_unit")
                },
                "candidates": len(group),
            }
        )
    return pd.DataFrame(cells, columns=CROSS_COLUMNS)
