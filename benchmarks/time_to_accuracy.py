"""Time to accuracy, the figure users pay for: the README's main job (the digits defaults, the digits CNN
teacher) on this machine, per variant and seed, until the student first reaches ``--target`` validation
accuracy, and the accuracy each variant has at equal wall time.

    python benchmarks/time_to_accuracy.py --storage /tmp/tta --json tta.json --seeds 0 1 2
    python benchmarks/time_to_accuracy.py --storage /tmp/tta --json tta.json --table

Variants: ``defaults`` (the shipped settings) and ``reference`` (``dynamics=reference``: the reference code's
dynamics); more with ``--variant NAME override ...``. Rows record the resolved config's hash, the commit, the
seed, and every epoch's wall seconds (from the run's start, its evaluations included) with its validation and
test accuracy. Wall seconds start after the teacher is trained (once, into ``--storage``, as in
``teacher_zoo.py``). Time the variants one after another on a quiet machine: wall time is the measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pyarrow.parquet as pq  # noqa: E402
import teacher_zoo as zoo  # noqa: E402

from cpsc_ray.runs.in_process import run_in_process  # noqa: E402

TEACHER = "digits_cnn"  # the main job's teacher and recipe
VARIANTS = {"defaults": [], "reference": ["dynamics=reference"]}


def run_variant(label: str, overrides: list[str], seed: int, storage: Path) -> dict:
    cfg = zoo.run_config(TEACHER, seed, storage, f"tta-{label}", overrides)
    weights = Path(cfg.teacher.weights)
    started = time.perf_counter()
    summary = run_in_process(cfg, progress=False)
    rows = sorted(pq.read_table(Path(summary["run_dir"]) / "metrics.parquet").to_pylist(), key=lambda r: r["epoch"])
    return {
        "label": label,
        "seed": seed,
        "config_hash": zoo.config_hash(cfg, weights),
        "commit": zoo.commit(),
        "overrides": overrides,
        "epochs": [
            {"epoch": r["epoch"], "wall_s": r["wall_s"], "val_acc": r["val_acc"], "test_acc": r["test_acc"]}
            for r in rows
        ],
        "warnings": summary["warnings"],
        "process_s": time.perf_counter() - started,
    }


def first_reaching(row: dict, target: float) -> float | None:
    """Wall seconds at the first epoch whose validation accuracy reaches ``target``; None if none does."""
    return next((e["wall_s"] for e in row["epochs"] if e["val_acc"] is not None and e["val_acc"] >= target), None)


def accuracy_at(row: dict, wall_s: float, metric: str) -> float | None:
    """``metric`` at the last evaluated epoch finished within ``wall_s``."""
    done = [e for e in row["epochs"] if e["wall_s"] <= wall_s and e[metric] is not None]
    return done[-1][metric] if done else None


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return "–"
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def table(rows: list[dict], target: float) -> str:
    budget = min(r["epochs"][-1]["wall_s"] for r in rows)  # every run got this far
    lines = [
        f"Equal wall time: {budget:.0f} s, the shortest run's whole length.",
        "",
        f"| variant | seeds | s to {100 * target:g}% val. (reached) | val. at {budget:.0f} s | test at {budget:.0f} s "
        "| val., last epoch | test, last epoch | whole run, s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(r["label"] for r in rows):
        cells = [r for r in rows if r["label"] == label]
        reached = [first_reaching(r, target) for r in cells]
        lines.append(
            f"| {label} | {' '.join(str(r['seed']) for r in cells)} | {mean_sd(reached, digits=0)} "
            f"({sum(t is not None for t in reached)} of {len(cells)}) "
            f"| {mean_sd([accuracy_at(r, budget, 'val_acc') for r in cells], 100, 2)} "
            f"| {mean_sd([accuracy_at(r, budget, 'test_acc') for r in cells], 100, 2)} "
            f"| {mean_sd([r['epochs'][-1]['val_acc'] for r in cells], 100, 2)} "
            f"| {mean_sd([r['epochs'][-1]['test_acc'] for r in cells], 100, 2)} "
            f"| {mean_sd([r['epochs'][-1]['wall_s'] for r in cells], digits=0)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", type=Path, required=True, help="the teacher and the runs are written here")
    parser.add_argument("--json", type=Path, required=True, help="results, one entry per run (appended)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="of: " + ", ".join(VARIANTS))
    parser.add_argument(
        "--variant", nargs="+", action="append", default=[], metavar="NAME_THEN_OVERRIDES", help="another variant"
    )
    parser.add_argument("--target", type=float, default=0.95, help="validation accuracy to reach")
    parser.add_argument("--table", action="store_true", help="print the table from the JSON, run nothing")
    args = parser.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants} | {name: list(o) for name, *o in args.variant}
    if not args.table:
        for seed in args.seeds:  # seed-major, so that a stopped session leaves every variant measured alike
            for label, overrides in variants.items():
                row = run_variant(label, overrides, seed, args.storage)
                zoo.append_row(args.json, row)
                reached = first_reaching(row, args.target)
                print(f"{label} seed {seed}: {args.target:.0%} at {reached} s", flush=True)
    rows = [r for r in zoo.read_rows(args.json) if r["label"] in variants]
    print(table(rows, args.target))


if __name__ == "__main__":
    main()
