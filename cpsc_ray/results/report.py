"""``cpsc-ray report``: compare methods across datasets and teacher/student pairs from the results
Parquet of any number of storages, and say what each number rests on and what it cost (see
``results.analysis``).

Writes into an output directory:

    summary.parquet        one row per dataset, pair and method/experiment (the comparison table)
    cross_dataset.parquet  the cross-dataset table's cells, one per (dataset, pair, method) with runs
    report.md              the tables, with the figures as files in plots/
    report.html            the same, self-contained (figures embedded as base64 PNG)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cpsc_ray.results import plots
from cpsc_ray.results.analysis import (
    DEFAULTS,
    PAIR,
    SUMMARY_COLUMNS,
    TRIAL,
    WEIGHTS,
    Entry,
    configs_at_best_epoch,
    cross_dataset,
    of_pair,
    summarize,
)
from cpsc_ray.results.render import Block, Heading, Link, Plot, Table, Text, to_html, to_markdown
from cpsc_ray.results.replay import clones, lineage_phases, mutated_keys
from cpsc_ray.results.schema import LOSS_METRICS, MIN_COVERAGE
from cpsc_ray.results.tables import Results, read_for_report, run_name, samples_png


def build_report(locations: Sequence[str] | str, out_dir: str | Path, experiments: list[str] | None = None) -> Path:
    """Read the results under ``locations`` (paths or URIs), write the report into ``out_dir`` (a
    local directory) and return the path of ``report.html``. Raises ResultsError on unusable input."""
    locations = [locations] if isinstance(locations, str) else list(locations)
    results = read_for_report(locations, experiments)
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


NOTES = (
    "n: the runs an accuracy rests on (seeds of a finalize rerun or of grouped distill runs; 1 for a tuning "
    "experiment's selected trial without a rerun, marked †). Accuracies in %, mean ± sample s.d. over those runs; "
    "test accuracy is read at the epoch of the best selection metric (validation accuracy, or the data-free proxy) "
    "and never used to choose. Compute counts every trial and seed, early-stopped and diverged ones included: "
    "device-hours are hours per worker summed over workers (CPU-h count worker processes, not cores). Queued: "
    "wall-clock hours the runs' worker groups waited for resources (other jobs, nodes still booting), which "
    "compute does not count. An empty cell had no runs."
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
            "reruns). defaults: distill runs with cpsc-ray's default loss settings. With several experiments of a "
            "method, the one with the best selection metric is shown. † single run: the selected trial, no finalize "
            "rerun."
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
    table = Table(["dataset", "teacher → student", *methods], [])  # a cell links to its experiment's section
    for key, _ in summary.groupby(PAIR, sort=True, dropna=False):
        identity = dict(zip(PAIR, key))
        cells = of_pair(cross, identity).set_index("method")
        row = [str(identity["dataset"]), pair_label(identity["teacher"], identity["student"])]
        for method in methods:
            if method not in cells.index:
                row.append("")
                continue
            cell = cells.loc[method]
            marker = "†" if cell.single_run else ""
            spent = hours(cell.device_hours, cell.compute_unit)
            text = f"{pct(cell.test_mean, cell.test_std)} (n={cell.n}{marker}) · {spent}"
            row.append(Link(text, run_anchor({**identity, "experiment": cell.experiment})))
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
    "queued",
    "hyperparameters",
]


def pair_row(row: dict[str, Any]) -> list[str | Link]:
    return [
        row["method"],
        Link(row["experiment"], run_anchor(row)),
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
        f"{row['queued_hours']:.3g} h",
        hyperparameter_text(row["hyperparameters"]),
    ]


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", "-".join(str(p) for p in parts)).strip("-")


def run_anchor(row: dict[str, Any]) -> str:
    """The id of a table row's section: its pair and experiment(s)."""
    return "run-" + _slug(row["dataset"], row["teacher"], row["student"], row["experiment"])


def _pair_section(results: Results, identity: dict[str, Any], entries: list[Entry]) -> list[Block]:
    dataset, pair = identity["dataset"], pair_label(identity["teacher"], identity["student"])
    slug = _slug(dataset, identity["teacher"], identity["student"])
    where = f"{dataset}, {pair}"
    epochs = of_pair(results.epochs, identity)
    lineage = results.lineage[results.lineage.dataset == dataset]
    teachers = sorted({pct(acc) for acc in epochs.teacher_test_acc.dropna()})
    blocks: list[Block] = [
        Heading(2, f"{dataset}: {pair}"),
        Text(f"Teacher test accuracy: {', '.join(teachers) or 'not recorded'} (the ceiling the students chase)."),
        Table(PAIR_HEADERS, [pair_row(e.row) for e in entries]),
        Text("Each experiment links to its section: accuracy and loss terms per epoch, and the synthetic images."),
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
                f"{where}: accuracy against compute",
                plots.accuracy_vs_compute(curves, outcomes, unit, f"{dataset}: {pair}"),
            )
        )
    blocks += _sensitivity_plot(results, identity, f"{slug}-sensitivity", where)
    for entry in entries:
        blocks += _run_section(results, epochs, lineage[lineage.experiment == entry.row["experiment"]], entry, where)
    return blocks


GENERATOR_TERMS = [m for m in LOSS_METRICS if m.startswith("g_")]
STUDENT_TERMS = [m for m in LOSS_METRICS if m.startswith("s_")]


def _run_section(
    results: Results, epochs: pd.DataFrame, lineage: pd.DataFrame, entry: Entry, where: str
) -> list[Block]:
    """A table row's own section: what its accuracy rests on, its accuracy and loss terms per epoch,
    the synthetic images of each run shown, and the hyperparameter phases of PBT's selected trial."""
    row = entry.row
    anchor = run_anchor(row)
    shown = pd.concat([entry.search[entry.search.trial_id == entry.selected], entry.reruns])
    names = _run_names(shown)
    blocks: list[Block] = [
        Heading(3, f"{where}: {row['method']}, {row['experiment']}", anchor),
        Text(
            f"Accuracy from: {row['accuracy_from']}. Runs shown: {', '.join(names) or 'none'}. Loss terms: "
            f"shaded epochs are those whose student predicted fewer than {MIN_COVERAGE:.0%} of the classes "
            "(collapsed), a red line the epoch a run diverged at."
        ),
    ]
    title = (
        f"{where}: {_label(entry)}, accuracy per epoch "
        f"({len(entry.search)} trials searched, {len(entry.reruns)} runs/seeds)"
    )
    blocks.append(
        Plot(
            f"{anchor}-epochs",
            title,
            plots.accuracy_per_epoch(
                _rows_of(epochs, entry.search), _rows_of(epochs, entry.reruns), entry.selected, title
            ),
        )
    )
    if not shown.empty:
        rows = _rows_of(epochs, shown)
        rows = rows.assign(run=_run_names(rows))
        title = f"{where}: {_label(entry)}, loss terms per epoch of {', '.join(names)}"
        terms = {"generator's loss terms (g_*)": GENERATOR_TERMS, "student's loss terms (s_*)": STUDENT_TERMS}
        blocks.append(Plot(f"{anchor}-losses", title, plots.loss_terms(rows, terms, MIN_COVERAGE, title)))
    for i, (_, trial) in enumerate(shown.iterrows()):
        name = names[i]
        png = samples_png(results, trial)
        if png is None:
            blocks.append(
                Text(f"{name}: no sample grid (it diverged, was stopped early, or its storage is elsewhere).")
            )
            continue
        caption = f"{where}: synthetic images of {name} after its last epoch ({trial.epochs}), one row per class"
        blocks.append(Plot(f"{anchor}-samples-{i}", caption, png))
    if entry.selected is not None and (not lineage.empty or row["method"] in ("pbt", "pb2")):
        blocks += _phases_plot(epochs, lineage, entry, f"{anchor}-schedule", where)
    return blocks


def _run_names(runs: pd.DataFrame) -> list[str]:
    return [run_name(r.kind, r.experiment, r.trial_id) for r in runs.itertuples()]


def _label(entry: Entry) -> str:
    text = f"{entry.row['method']}: {entry.row['experiment']}"
    return text if len(text) <= 48 else text[:45] + "..."


def _rows_of(epochs: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    return epochs.merge(trials[TRIAL].drop_duplicates(), on=TRIAL)


def _phases_plot(epochs: pd.DataFrame, lineage: pd.DataFrame, entry: Entry, name: str, where: str) -> list[Block]:
    experiment = entry.row["experiment"]
    own = epochs[epochs.experiment == experiment]
    winner = entry.search[entry.search.trial_id == entry.selected].iloc[0]
    until = int(winner.epochs)
    mutated = mutated_keys(own, lineage)
    if not mutated:
        return []
    phases = lineage_phases(own, lineage, entry.selected, until)
    title = f"{where}: {experiment}, hyperparameter schedule of the selected trial {entry.selected}"
    return [Plot(name, title, plots.pbt_phases(phases, mutated, until, clones(lineage, entry.selected, until), title))]


def _sensitivity_plot(results: Results, identity: dict[str, Any], name: str, where: str) -> list[Block]:
    trials = of_pair(results.trials, identity)
    trials = trials[trials.kind != "finalize"]  # a rerun's seeds repeat one config
    configs = configs_at_best_epoch(trials, of_pair(results.epochs, identity)).reset_index()
    points = trials[[*TRIAL, "method", "score", "diverged"]].merge(configs, on=TRIAL)
    points = points.rename(columns={f"config/{w}": w for w in WEIGHTS}).rename(columns={"method": "label"})
    points = points[points.score.notna()].assign(diverged=points.diverged.astype(bool))
    if len(points) < 2 or all(points[w].nunique() < 2 for w in WEIGHTS):
        return []
    metric = "/".join(sorted(set(trials.selection.dropna())))
    title = f"{where}: loss-weight sensitivity ({len(points)} trials and runs; config at each one's best epoch)"
    return [Plot(name, title, plots.sensitivity(points, WEIGHTS, metric, title))]
