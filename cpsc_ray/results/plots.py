"""The report's figures as PNG bytes.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never through
pyplot: no global backend switch and no open-figure registry in a process that may be a Ray driver.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter

DPI = 100


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {label: palette(i % 10) for i, label in enumerate(labels)}


def _percent_axis(ax, label: str = "accuracy") -> None:
    """Accuracy in %, the axis kept within 0 to 100% (autoscaling pads past the data: a single point at
    98% would get an axis up to 102%). Call after plotting."""
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 1.0))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def _log_x(ax) -> None:
    """A log axis labelled at 1, 2 and 5 per decade: searched ranges often span less than one decade."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def accuracy_per_epoch(search: pd.DataFrame, reruns: pd.DataFrame, selected: str | None, title: str) -> bytes:
    """Validation and test accuracy per epoch, one line per trial. ``search`` holds trials (thin grey,
    the ``selected`` one black), ``reruns`` seeds of a rerun or distill runs (coloured, labelled)."""
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    seeds = sorted(reruns.groupby(["experiment", "trial_id"]).groups) if not reruns.empty else []
    colors = _colors([f"{e}/{t}" for e, t in seeds])
    for ax, metric in zip(axes, ("val_acc", "test_acc")):
        for trial_id, rows in search.groupby("trial_id"):
            rows = rows.sort_values("epoch")
            chosen = trial_id == selected
            ax.plot(
                rows.epoch,
                rows[metric],
                color="black" if chosen else "0.6",
                lw=1.8 if chosen else 0.8,
                label=f"selected trial {trial_id}" if chosen else None,
                zorder=3 if chosen else 2,
            )
        for (experiment, trial_id), rows in reruns.groupby(["experiment", "trial_id"]):
            rows = rows.sort_values("epoch")
            label = f"{experiment}/{trial_id}"
            ax.plot(
                rows.epoch, rows[metric], color=colors[label], lw=1.4, ls="--" if not search.empty else "-", label=label
            )
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _percent_axis(ax, metric)
    handles, labels = axes[0].get_legend_handles_labels()
    if labels:
        axes[1].legend(handles, labels, fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def accuracy_vs_compute(curves: pd.DataFrame, outcomes: pd.DataFrame, unit: str, title: str) -> bytes:
    """Left: each trial's validation accuracy against the synthetic images its state has seen
    (``curves``: epochs rows with a ``label`` column). Right: each row's test accuracy (mean, s.d.)
    against the compute it spent in all (``outcomes``: label, test_mean, test_std, hours)."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    colors = _colors(sorted(set(curves.label) | set(outcomes.label)))
    for (label, _, _), rows in curves.groupby(["label", "experiment", "trial_id"]):
        rows = rows.sort_values("epoch")
        left.plot(rows.images, rows.val_acc, color=colors[label], lw=0.9, alpha=0.8)
    for label in sorted(set(curves.label)):
        left.plot([], [], color=colors[label], label=label)
    left.set_xlabel("synthetic images (cumulative per trial)")
    left.set_title("val_acc per trial")
    left.legend(fontsize=7)
    _percent_axis(left, "val_acc")
    for row in outcomes.itertuples():
        right.errorbar(
            row.hours,
            row.test_mean,
            yerr=0 if pd.isna(row.test_std) else row.test_std,
            fmt="o",
            color=colors[row.label],
            capsize=3,
            label=f"{row.label} (n={row.n})",
        )
    if (outcomes.hours > 0).all():
        _log_x(right)
    right.set_xlabel(f"{unit}-hours spent (all trials and seeds)")
    right.set_title("test accuracy of the selected configuration")
    right.legend(fontsize=7)
    _percent_axis(right, "test accuracy")
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def pbt_phases(
    phases: list[tuple[int, dict[str, Any]]],
    keys: Sequence[str],
    until: int,
    clones: list[tuple[int, str]],
    title: str,
) -> bytes:
    """Each mutated hyperparameter along the selected trial's lineage: the value in effect during every
    epoch (epoch e spans (e-1, e]), and dotted lines where the state was cloned from another trial."""
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(3.6 * columns, 2.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    epochs = range(1, until + 1)
    for ax, key in zip(axes, keys):
        values = [_in_effect(phases, epoch).get(key) for epoch in epochs]
        numbers = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan for v in values]
        ax.stairs(numbers, range(0, until + 1), baseline=None, color="C0", lw=1.5)
        finite = [v for v in numbers if not math.isnan(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
            ax.set_yscale("log")
        for epoch, _ in clones:
            ax.axvline(epoch, color="C3", lw=0.8, ls=":")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("value")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    cloned = ", ".join(f"from {source} after epoch {epoch}" for epoch, source in clones) or "no clone"
    fig.suptitle(f"{title}\nclones along the lineage: {cloned}", fontsize=9)
    return _png(fig)


def _in_effect(phases: list[tuple[int, dict[str, Any]]], epoch: int) -> dict[str, Any]:
    current: dict[str, Any] = {}
    for start, config in phases:
        if start > epoch:
            break
        current = config
    return current


def sensitivity(points: pd.DataFrame, weights: Sequence[str], metric: str, title: str) -> bytes:
    """The selection metric of each trial against each loss weight (the config at its best epoch);
    ``points``: label, score, diverged and one column per weight."""
    fig = Figure(figsize=(3.2 * len(weights), 3.2), layout="constrained")
    axes = fig.subplots(1, len(weights), sharey=True, squeeze=False).ravel()
    colors = _colors(sorted(set(points.label)))
    for ax, weight in zip(axes, weights):
        for (label, diverged), rows in points.groupby(["label", "diverged"]):
            ax.scatter(
                rows[weight],
                rows.score,
                color=colors[label],
                marker="x" if diverged else "o",
                s=22,
                label=f"{label}{' (diverged)' if diverged else ''}",
            )
        if (points[weight].dropna() > 0).all():
            _log_x(ax)
        ax.set_xlabel(weight)
        _percent_axis(ax, f"best {metric}")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


TILE_PX = 64  # a synthetic image's shown size: 8-, 16- and 32-pixel images are upscaled to at least this


def sample_grid(images: np.ndarray, labels: np.ndarray, title: str) -> bytes:
    """Synthetic images as a grid, one row per class labelled with its index, upscaled without smoothing
    so that each pixel stays visible. ``images``: N×H×W×C in [0, 1], class-major; ``labels``: N class indices."""
    classes = list(dict.fromkeys(labels.tolist()))
    per_class = len(labels) // len(classes)
    size, channels = images.shape[1], images.shape[3]
    gap = 1
    rows = np.ones((len(classes) * (size + gap) - gap, per_class * (size + gap) - gap, channels))
    for row, label in enumerate(classes):
        for column, image in enumerate(images[labels == label][:per_class]):
            top, left = row * (size + gap), column * (size + gap)
            rows[top : top + size, left : left + size] = image
    scale = max(1, math.ceil(TILE_PX / size))
    height, width = rows.shape[0] * scale / DPI, rows.shape[1] * scale / DPI
    fig = Figure(figsize=(width + 1.4, height + 1.0))
    ax = fig.add_axes((0.9 / (width + 1.4), 0.5 / (height + 1.0), width / (width + 1.4), height / (height + 1.0)))
    ax.imshow(rows.squeeze(-1) if channels == 1 else rows, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([row * (size + gap) + size / 2 - 0.5 for row in range(len(classes))], [str(c) for c in classes])
    ax.set_xticks([])
    ax.set_ylabel("class")
    ax.set_xlabel(f"{per_class} samples per class ({size}×{size} px, shown ×{scale})")
    fig.suptitle(title, fontsize=9, y=1 - 0.12 / (height + 1.0), va="top", wrap=True)
    return _png(fig)


def _fit_loss_scale(ax, values: pd.Series) -> str:
    """A log scale where the values span more than two decades: symmetric log (linear near zero) when
    some are zero or negative. Returns the y label that says which."""
    magnitudes = values.abs()[values.abs() > 0]
    if magnitudes.empty or magnitudes.max() / magnitudes.min() <= 100:
        return "loss"
    if (values > 0).all():
        ax.set_yscale("log")
        return "loss (log scale)"
    threshold = 10 ** math.floor(math.log10(magnitudes.min()))
    ax.set_yscale("symlog", linthresh=threshold)
    return f"loss (symmetric log: linear within ±{threshold:.0e})"


def loss_terms(epochs: pd.DataFrame, terms: dict[str, Sequence[str]], min_coverage: float, title: str) -> bytes:
    """Each loss term per epoch, one panel per loss (``terms``: panel title -> columns), a colour per term
    and a line style per run (``epochs``: rows with a ``run`` label; a line's gid is ``<run>:<column>``).
    A red line marks the epoch a run diverged at; epochs whose student predicted fewer than
    ``min_coverage`` of the classes are shaded."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, len(terms), squeeze=False).ravel()
    runs = sorted(set(epochs.run))
    styles = dict(zip(runs, ["-", "--", ":", "-."] * len(runs)))
    for ax, (panel, columns) in zip(axes, terms.items()):
        columns = [c for c in columns if epochs[c].notna().any()]
        colors = _colors(columns)
        for run, rows in epochs.groupby("run"):
            rows = rows.sort_values("epoch")
            for column in columns:
                ax.plot(rows.epoch, rows[column], color=colors[column], ls=styles[run], lw=1.2, gid=f"{run}:{column}")
            for epoch in rows.epoch[rows.diverged.astype(bool)]:
                ax.axvline(epoch, color="red", lw=1.2)
            for epoch in rows.epoch[rows.class_coverage < min_coverage]:
                ax.axvspan(epoch - 1, epoch, color="orange", alpha=0.2, lw=0)
        for column in columns:
            ax.plot([], [], color=colors[column], label=column)
        if len(runs) > 1:
            for run in runs:
                ax.plot([], [], color="0.3", ls=styles[run], label=run)
        if epochs.diverged.astype(bool).any():
            ax.plot([], [], color="red", label="diverged: a loss became NaN or infinite")
        if (epochs.class_coverage < min_coverage).any():
            ax.fill_between([], [], color="orange", alpha=0.2, label=f"collapsed (< {min_coverage:.0%} of classes)")
        values = pd.Series(epochs[columns].to_numpy(dtype=float).ravel())
        ax.set_ylabel(_fit_loss_scale(ax, values[np.isfinite(values)]))
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return _png(fig)
