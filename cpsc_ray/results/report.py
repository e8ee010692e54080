"""``cpsc-ray report``: compare methods across datasets and teacher/student pairs from the results
Parquet of any number of storages, and say what each number rests on and what it cost.

Writes into an output directory:

    summary.parquet        one row per dataset, pair and method/experiment (the comparison table)
    cross_dataset.parquet  the cross-dataset table's cells, one per (dataset, pair, method) with runs
    report.md              the tables, with the figures as files in plots/
    report.html            the same, self-contained (figures embedded as base64 PNG)

What a row's accuracy rests on:
- distill runs: the runs that trained the same config, whatever their seeds, grouped;
- a tuning experiment with a finalize rerun: the rerun's seeds (the latest rerun if there are several);
- a tuning experiment without one: its selected trial alone, marked as a single run.
The selected trial is the one ``finalize`` reruns: the best selection metric (validation accuracy or
the data-free proxy) among non-diverged trials. Test accuracy is reported, never used to choose.
A row's compute sums every trial and seed it ran, early-stopped and diverged ones included.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from cpsc_ray.cluster.finalize import replay_schedule
from cpsc_ray.results import plots
from cpsc_ray.results.records import Results, ResultsError, best_trial, config_values, read_results
from cpsc_ray.storage import Storage

PAIR = ["dataset", "teacher", "student"]
TRIAL = ["experiment", "trial_id"]
RUN_KEYS = {"name", "seed", "output_dir"}  # they name a run and where it writes, not what it trains
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


def build_report(locations: Sequence[str] | str, out_dir: str | Path, experiments: list[str] | None = None) -> Path:
    """Read the results under ``locations`` (paths or URIs), write the report into ``out_dir`` (a
    local directory) and return the path of ``report.html``. Raises ResultsError on unusable input."""
    locations = [locations] if isinstance(locations, str) else list(locations)
    results = load(locations, experiments)
    entries = summarize(results)
    summary = pd.DataFrame([e.row for e in entries], columns=SUMMARY_COLUMNS)
    cross = cross_dataset(summary)
    out = Path(out_dir)
    figures = out / "plots"
    figures.mkdir(parents=True, exist_ok=True)
    for stale in figures.glob("*.png"):  # figures of an earlier report into the same directory
        stale.unlink()
    summary.to_parquet(out / "summary.parquet", index=False)
    cross.to_parquet(out / "cross_dataset.parquet", index=False)
    blocks = compose(results, entries, summary, cross, locations)
    (out / "report.md").write_text(to_markdown(blocks, figures))
    page = out / "report.html"
    page.write_text(to_html(blocks))
    return page


# ----- reading --------------------------------------------------------------------------------------
def load(locations: list[str], experiments: list[str] | None = None) -> Results:
    """Every location's results. An experiment found under two locations is refused: its rows would mix."""
    parts: list[Results] = []
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
        parts.append(part)
    results = Results(
        *(pd.concat([getattr(p, table) for p in parts], ignore_index=True) for table in ("epochs", "trials", "lineage"))
    )
    if results.trials.empty:
        chosen = f" for experiments {', '.join(experiments)}" if experiments else ""
        raise ResultsError(
            f"{', '.join(locations)}: no runs in these results{chosen}; run cpsc-ray distill, tune or finalize with "
            "--storage pointing here, or give the location they wrote to"
        )
    return results


# ----- the comparison table -------------------------------------------------------------------------
def summarize(results: Results) -> list[Entry]:
    entries: list[Entry] = []
    for key, trials in results.trials.groupby(PAIR, sort=True, dropna=False):
        identity = dict(zip(PAIR, key))
        epochs = _of_pair(results.epochs, identity)
        keys = shown_keys(epochs)
        configs = configs_at_best_epoch(trials, epochs)
        entries += _distill_entries(identity, trials[trials.kind == "distill"], keys)
        entries += _tuned_entries(identity, trials, configs, keys)
    return entries


def _of_pair(frame: pd.DataFrame, identity: dict[str, Any]) -> pd.DataFrame:
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


def source_experiment(final: str, method: str, tuned: pd.DataFrame) -> str | None:
    """The tuning experiment a finalize experiment reran: finalize names its reruns ``<EXP>-final``, or
    ``<EXP>-final-<timestamp>`` when that name is taken, and records the experiment's method."""
    names = tuned[tuned.method == method].experiment.unique()
    candidates = [e for e in names if final == f"{e}-final" or final.startswith(f"{e}-final-")]
    return max(candidates, key=len, default=None)


def _tuned_entries(
    identity: dict[str, Any], trials: pd.DataFrame, configs: pd.DataFrame, keys: list[str]
) -> Iterator[Entry]:
    tuned = trials[trials.kind == "tune"]
    finals = trials[trials.kind == "finalize"]
    owner = {
        final: source_experiment(final, group.method.iloc[0], tuned) for final, group in finals.groupby("experiment")
    }
    order = tuned[["method", "experiment"]].drop_duplicates().sort_values(["method", "experiment"])
    for method, experiment in order.itertuples(index=False):
        search = tuned[tuned.experiment == experiment]
        reruns = sorted(f for f, source in owner.items() if source == experiment)  # timestamped reruns sort later
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
                accuracy_from=f"finalize rerun {reruns[-1]}"
                + (f" (latest of {len(reruns)})" if len(reruns) > 1 else ""),
            )
        elif winner is not None:
            units = search[search.trial_id == winner.trial_id]
            fields.update(accuracy_from=f"selected trial {winner.trial_id}, single run", single_run=True)
        else:
            units = search.iloc[0:0]
            fields.update(accuracy_from="no trial finished with a score")
        yield Entry(
            _row(identity, units, spent, config, keys, **fields),
            search=search,
            reruns=finals[finals.experiment.isin(reruns)],
            selected=fields["selected_trial"],
        )
    for final, source in sorted(owner.items()):
        if source is not None:
            continue
        group = finals[finals.experiment == final]
        units = group[~group.diverged.astype(bool)]
        config = _config(configs, final, units.trial_id.iloc[0]) if not units.empty else {}
        yield Entry(
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
    """Per dataset, pair and method (the paper's weights or a tuning method) the test accuracy of the
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


# ----- the document ---------------------------------------------------------------------------------
@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Plot:
    name: str
    caption: str
    png: bytes


Block = Heading | Text | Table | Plot

NOTES = (
    "n: the runs an accuracy rests on (seeds of a finalize rerun or of grouped distill runs; 1 for a tuning "
    "experiment's selected trial without a rerun, marked †). Accuracies in %, mean ± sample s.d. over those runs; "
    "test accuracy is read at the epoch of the best selection metric (validation accuracy, or the data-free proxy) "
    "and never used to choose. Compute counts every trial and seed, early-stopped and diverged ones included: "
    "device-hours are hours per worker summed over workers (CPU-h count worker processes, not cores). An empty "
    "cell had no runs."
)


def pct(mean: Any, sd: Any = None) -> str:
    if mean is None or pd.isna(mean):
        return ""
    return f"{100 * mean:.2f}" + ("" if sd is None or pd.isna(sd) else f" ± {100 * sd:.2f}")


def hours(value: float, unit: str) -> str:
    return f"{value:.3g} {unit}-h"


def pair_label(teacher: Any, student: Any) -> str:
    return f"{teacher} → {student}"


def hyperparameter_text(encoded: str) -> str:
    def shown(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "none" if value is None else str(value)

    return ", ".join(f"{k.removeprefix('loss.')}={shown(v)}" for k, v in json.loads(encoded).items())


def compose(
    results: Results, entries: list[Entry], summary: pd.DataFrame, cross: pd.DataFrame, locations: list[str]
) -> list[Block]:
    blocks: list[Block] = [
        Heading(1, "cpsc-ray report"),
        Text(
            f"Results from {', '.join(locations)}: {results.trials.experiment.nunique()} experiments, "
            f"{len(results.trials)} trials and runs, {len(results.epochs)} epochs."
        ),
        Text(NOTES),
        Heading(2, "Across datasets"),
        cross_table(summary, cross),
        Text(
            "Cells: test accuracy of the selected configuration (n runs) · compute of the whole method (search, "
            "reruns). defaults: distill runs with the paper's loss weights. With several experiments of a method, "
            "the one with the best selection metric is shown. † single run: the selected trial, no finalize rerun."
        ),
    ]
    for key in summary[PAIR].drop_duplicates().sort_values(PAIR).itertuples(index=False):
        identity = dict(zip(PAIR, key))
        pair_entries = [e for e in entries if all(e.row[c] == v for c, v in identity.items())]
        blocks += _pair_section(results, identity, pair_entries)
    return blocks


def cross_table(summary: pd.DataFrame, cross: pd.DataFrame) -> Table:
    tuning = sorted(set(summary.method[summary.kind != "distill"]))
    methods = [DEFAULTS, *tuning]
    table = Table(["dataset", "teacher → student", *methods], [])
    for key, _ in summary.groupby(PAIR, sort=True, dropna=False):
        identity = dict(zip(PAIR, key))
        cells = _of_pair(cross, identity).set_index("method")
        row = [str(identity["dataset"]), pair_label(identity["teacher"], identity["student"])]
        for method in methods:
            if method not in cells.index:
                row.append("")
                continue
            cell = cells.loc[method]
            marker = "†" if cell.single_run else ""
            row.append(
                f"{pct(cell.test_mean, cell.test_std)} (n={cell.n}{marker}) · "
                f"{hours(cell.device_hours, cell.compute_unit)}"
            )
        table.rows.append(row)
    return table


PAIR_HEADERS = [
    "method",
    "experiment",
    "accuracy from",
    "n",
    "selected by",
    "val acc (best)",
    "test acc at best",
    "test acc (last epoch)",
    "trials searched",
    "runs in compute",
    "diverged",
    "compute",
    "hyperparameters",
]


def pair_row(row: dict[str, Any]) -> list[str]:
    return [
        row["method"],
        row["experiment"],
        row["accuracy_from"],
        f"{row['n']}{'†' if row['single_run'] else ''}",
        row["selection"],
        pct(row["val_mean"], row["val_std"]),
        pct(row["test_mean"], row["test_std"]),
        pct(row["last_test_mean"], row["last_test_std"]),
        "" if row["trials"] is None else str(row["trials"]),
        str(row["runs"]),
        str(row["diverged"]),
        hours(row["device_hours"], row["compute_unit"])
        + (f" ({row['device']})" if row["compute_unit"] != "CPU" else ""),
        hyperparameter_text(row["hyperparameters"]),
    ]


def _pair_section(results: Results, identity: dict[str, Any], entries: list[Entry]) -> list[Block]:
    dataset, pair = identity["dataset"], pair_label(identity["teacher"], identity["student"])
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{dataset}-{identity['teacher']}-{identity['student']}").strip("-")
    epochs = _of_pair(results.epochs, identity)
    lineage = results.lineage[results.lineage.dataset == dataset]
    teachers = sorted({pct(acc) for acc in epochs.teacher_test_acc.dropna()})
    blocks: list[Block] = [
        Heading(2, f"{dataset}: {pair}"),
        Text(f"Teacher test accuracy: {', '.join(teachers) or 'not recorded'} (the ceiling the students chase)."),
        Table(PAIR_HEADERS, [pair_row(e.row) for e in entries]),
    ]
    unit = "/".join(sorted({e.row["compute_unit"] for e in entries}))
    scored = [e for e in entries if e.row["n"] > 0]
    if scored:
        curves = pd.concat([_rows_of(epochs, pd.concat([e.search, e.reruns])).assign(label=_label(e)) for e in entries])
        outcomes = pd.DataFrame(
            [
                {
                    "label": _label(e),
                    "test_mean": e.row["test_mean"],
                    "test_std": e.row["test_std"],
                    "hours": e.row["device_hours"],
                    "n": e.row["n"],
                }
                for e in scored
            ]
        )
        blocks.append(
            Plot(
                f"{slug}-compute",
                f"{dataset}, {pair}: accuracy against compute",
                plots.accuracy_vs_compute(curves, outcomes, unit, f"{dataset}: {pair}"),
            )
        )
    for i, entry in enumerate(entries):
        row = entry.row
        title = (
            f"{dataset}, {pair}: {_label(entry)}, accuracy per epoch "
            f"({len(entry.search)} trials searched, {len(entry.reruns)} runs/seeds)"
        )
        blocks.append(
            Plot(
                f"{slug}-{i}-epochs",
                title,
                plots.accuracy_per_epoch(
                    _rows_of(epochs, entry.search), _rows_of(epochs, entry.reruns), entry.selected, title
                ),
            )
        )
        experiment_lineage = lineage[lineage.experiment == row["experiment"]]
        if entry.selected is not None and (not experiment_lineage.empty or row["method"] in ("pbt", "pb2")):
            blocks += _schedule_plot(epochs, experiment_lineage, entry, f"{slug}-{i}-schedule", f"{dataset}, {pair}")
    sensitivity = _sensitivity_plot(results, identity, f"{slug}-sensitivity", f"{dataset}, {pair}")
    return blocks + sensitivity


def _label(entry: Entry) -> str:
    text = f"{entry.row['method']}: {entry.row['experiment']}"
    return text if len(text) <= 48 else text[:45] + "..."


def _rows_of(epochs: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    return epochs.merge(trials[TRIAL].drop_duplicates(), on=TRIAL)


def _schedule_plot(epochs: pd.DataFrame, lineage: pd.DataFrame, entry: Entry, name: str, where: str) -> list[Block]:
    experiment = entry.row["experiment"]
    own = epochs[epochs.experiment == experiment]
    winner = entry.search[entry.search.trial_id == entry.selected].iloc[0]
    until = int(winner.epochs)
    mutated = mutated_keys(own, lineage)
    if not mutated:
        return []
    schedule = replay_schedule(own, lineage, entry.selected, until)
    title = f"{where}: {experiment}, hyperparameter schedule of the selected trial {entry.selected}"
    return [
        Plot(name, title, plots.pbt_schedule(schedule, mutated, until, clones(lineage, entry.selected, until), title))
    ]


def mutated_keys(epochs: pd.DataFrame, lineage: pd.DataFrame) -> list[str]:
    """The numeric keys an exploit changed (the config a clone ran with against the one it had), or
    without any exploit the numeric keys the population was sampled over."""
    changed: set[str] = set()
    for record in lineage.itertuples():
        before, after = json.loads(record.config_before) or {}, json.loads(record.config_after)
        changed |= {k for k, v in after.items() if before.get(k) != v and isinstance(v, (int, float))}
    if not changed:
        changed = {
            c.removeprefix("config/")
            for c in epochs.columns
            if c.startswith("config/") and pd.api.types.is_numeric_dtype(epochs[c]) and epochs[c].nunique() > 1
        }
    return sorted(changed - RUN_KEYS)


def clones(lineage: pd.DataFrame, trial_id: str, until: int) -> list[tuple[int, str]]:
    """The clones along the lineage of the state ``trial_id`` holds at ``until``, earliest first, as
    (the source's epoch the state was copied at, the source trial), the way replay_schedule walks it."""
    records = lineage[(lineage.trial_id == trial_id) & (lineage.epoch < until)].sort_values("epoch")
    if records.empty:
        return []
    last = records.iloc[-1]
    return [*clones(lineage, last.source_trial_id, int(last.epoch)), (int(last.epoch), last.source_trial_id)]


def _sensitivity_plot(results: Results, identity: dict[str, Any], name: str, where: str) -> list[Block]:
    trials = _of_pair(results.trials, identity)
    trials = trials[trials.kind != "finalize"]  # a rerun's seeds repeat one config
    configs = configs_at_best_epoch(trials, _of_pair(results.epochs, identity)).reset_index()
    points = trials[[*TRIAL, "method", "score", "diverged"]].merge(configs, on=TRIAL)
    points = points.rename(columns={f"config/{w}": w for w in WEIGHTS}).rename(columns={"method": "label"})
    points = points[points.score.notna()].assign(diverged=points.diverged.astype(bool))
    if len(points) < 2 or all(points[w].nunique() < 2 for w in WEIGHTS):
        return []
    metric = "/".join(sorted(set(trials.selection.dropna())))
    title = f"{where}: loss-weight sensitivity ({len(points)} trials and runs; config at each one's best epoch)"
    return [Plot(name, title, plots.sensitivity(points, WEIGHTS, metric, title))]


# ----- rendering ------------------------------------------------------------------------------------
def to_markdown(blocks: list[Block], figures: Path) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += [f"{'#' * block.level} {block.text}", ""]
        elif isinstance(block, Text):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            cell = lambda text: text.replace("|", "\\|")  # noqa: E731
            lines.append("| " + " | ".join(cell(h) for h in block.headers) + " |")
            lines.append("|" + "---|" * len(block.headers))
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        else:
            (figures / f"{block.name}.png").write_bytes(block.png)
            lines += [f"![{block.caption}]({figures.name}/{block.name}.png)", ""]
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { margin: 1em 0; }
img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; }
"""


def to_html(blocks: list[Block]) -> str:
    esc = html.escape
    parts = [
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>cpsc-ray report</title><style>{STYLE}</style>"
        "</head><body>"
    ]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in block.headers)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(block.png).decode()
            parts.append(
                f"<figure><img alt='{esc(block.caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>\n")
    return "\n".join(parts)
