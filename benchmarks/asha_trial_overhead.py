"""What a multi-worker tuning trial costs beyond the same run's `distill --workers 2`: the wall time of
`distill --workers 2` for E epochs against one 2-worker ASHA trial of E epochs at the same config
(the digits default, as `tune --seed-defaults` starts it). ``ray.init`` is excluded from both.

Before issue 11 such a trial ran one Ray Train run per epoch ("rounds", as PBT needs); now it is one
Train run reporting to Tune. Run it on both versions of the code (PYTHONPATH=<checkout>) to compare.

    python benchmarks/asha_trial_overhead.py --epochs 6 --json out.json [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch

from cpsc_ray.cluster.train import run_distributed
from cpsc_ray.cluster.tune import TuneOptions, run_tune
from cpsc_ray.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # 3 logical CPUs: the trial itself holds a sliver of one besides its 2 workers of 1 CPU each.
    ray.init(num_cpus=3, include_dashboard=True)
    storage = tempfile.mkdtemp(prefix="asha-overhead-")
    cfg = load_config("digits", [f"train.epochs={args.epochs}", f"output_dir={storage}", *args.overrides])
    results = {}

    started = time.perf_counter()
    summary = run_distributed(cfg.model_copy(update={"name": "distill"}), workers=2, cpus_per_worker=1)
    rows = pq.read_table(f"{summary['run_dir']}/metrics.parquet").to_pylist()
    results["distill --workers 2"] = {
        "wall_s": time.perf_counter() - started,
        "train_s": sum(r["epoch_s"] for r in rows),
    }

    options = TuneOptions(
        space="digits_pbt",
        scheduler="asha",
        num_samples=1,
        seed_defaults=True,
        workers_per_trial=2,
        cpus_per_worker=1,
        storage=storage,
        name="asha",
        grace_period=args.epochs,
    )
    started = time.perf_counter()
    run_tune(cfg, options)
    rows = pq.read_table(next(Path(storage, "asha/cpsc/trials").iterdir()) / "metrics.parquet").to_pylist()
    results["ASHA trial, 2 workers"] = {
        "wall_s": time.perf_counter() - started,
        "train_s": sum(r["epoch_s"] for r in rows),
    }

    for mode, numbers in results.items():
        print(f"{mode}: {numbers['wall_s']:.1f} s wall, {numbers['train_s']:.1f} s in epochs")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"epochs": args.epochs, "overrides": args.overrides, **results}, indent=2)
        )


if __name__ == "__main__":
    main()
