"""Does tuning beat the paper's defaults? On the digits default, at equal search compute.

1. METHOD.md's default weights, ``--seeds`` seeds.
2. Random search, Optuna TPE (with ASHA) and PBT, each stopped once its trials together have
   synthesized ``--budget-runs`` default runs' worth of images (step counts are searched, so trials
   differ in cost: compute is counted in images, not trials).
3. ``finalize``: the configuration each method selects (by validation accuracy; for PBT the winner's
   replayed schedule) rerun from scratch over ``--seeds`` seeds; their test accuracy is the answer.

Every run uses the same per-run budget (``--epochs``). Results land in ``--storage``; the table is
printed and written as JSON.

    python benchmarks/tuning_study.py --storage runs/study --json study.json

Parts whose results are already in ``--storage`` are reused, so an interrupted study goes on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import ray
import torch

from cpsc_ray.cluster.finalize import finalize, select
from cpsc_ray.cluster.tune import TuneOptions, run_tune
from cpsc_ray.config import load_config
from cpsc_ray.results.tables import ResultsError, read_results
from cpsc_ray.runs.in_process import run_in_process
from cpsc_ray.storage import Storage

METHODS = {
    "random": dict(space="digits_optuna", search="random", scheduler="fifo", num_samples=200),
    "optuna": dict(space="digits_optuna", search="optuna", scheduler="asha", num_samples=200, grace_period=2),
    "pbt": dict(space="digits_pbt", scheduler="pbt", num_samples=8, perturbation_interval=2),
}


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} +/- {100 * spread:.2f}"


def done(storage: str) -> set[str]:
    """Experiments whose results are already published under ``storage``: the study resumes by part."""
    try:
        return set(read_results([storage]).trials.experiment)
    except ResultsError:
        return set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default="runs/study")
    parser.add_argument("--epochs", type=int, default=8, help="per-run budget (the digits default has 16)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-runs", type=int, default=8, help="search compute, in default runs' images")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ray.init(num_cpus=2, include_dashboard=True)
    common = [f"train.epochs={args.epochs}", f"output_dir={args.storage}"]
    cfg = load_config("digits", common)
    t = cfg.train
    run_images = t.epochs * t.iterations_per_epoch * (t.g_steps + t.s_steps) * t.batch_size

    # A part whose results are published is not rerun; an interrupted search starts over.
    for seed in range(args.seeds):
        if f"defaults-s{seed}" not in done(args.storage):
            run_in_process(load_config("digits", [*common, f"seed={seed}", f"name=defaults-s{seed}"]), progress=False)
    for method in args.methods:
        options = TuneOptions(
            storage=args.storage,
            name=f"study-{method}",
            budget_images=args.budget_runs * run_images,
            max_concurrent=2,
            search_seed=0,
            **METHODS[method],
        )
        if options.name not in done(args.storage):
            shutil.rmtree(Path(args.storage) / options.name, ignore_errors=True)
            run_tune(cfg, options)
        if f"{options.name}-final" not in done(args.storage):
            finalize(options.name, args.seeds, args.storage)

    results = read_results([args.storage])
    trials = results.trials
    defaults = trials[trials.experiment.str.fullmatch(r"defaults-s\d+")]
    table = {
        "defaults": {
            "search_images": 0,
            "trials": 0,
            "best_val": float(defaults.best_val_acc.max()),
            "test_at_best": defaults.test_at_best.tolist(),
            "final_images": int(defaults.images.sum()),
        }
    }
    for method in args.methods:
        search = trials[trials.experiment == f"study-{method}"]
        final = trials[trials.experiment == f"study-{method}-final"]
        picked = final[~final.diverged.astype(bool)]
        table[method] = {
            "search_images": int(search.images.sum()),
            "trials": len(search),
            "diverged_trials": int(search.diverged.astype(bool).sum()),
            "best_val": float(search.score.max()),
            "test_at_best": picked.test_at_best.tolist(),
            "diverged_seeds": len(final) - len(picked),
            "final_images": int(final.images.sum()),
            "winner": select(Storage(args.storage), f"study-{method}")[0].trial_id,
        }
    print(
        f"\nper-run budget {run_images:,} images ({args.epochs} epochs); search budget "
        f"{args.budget_runs * run_images:,} images per method; {args.seeds} seeds per selected configuration"
    )
    print(
        f"{'method':10s} {'trials':>6s} {'search images':>14s} {'best val':>9s} "
        f"{'test acc of its pick (mean +/- sd)':>36s}"
    )
    for method, row in table.items():
        print(
            f"{method:10s} {row['trials']:>6d} {row['search_images']:>14,d} {100 * row['best_val']:>8.2f}% "
            f"{mean_std(row['test_at_best']):>36s}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(table, out, indent=2, default=str)


if __name__ == "__main__":
    main()
