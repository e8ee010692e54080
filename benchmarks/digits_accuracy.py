"""The main job's outcome over several seeds: teacher accuracy and the data-free student's test
accuracy (last epoch, and at the epoch chosen by validation accuracy), mean and spread.

    python benchmarks/digits_accuracy.py --seeds 0 1 2 [--output-dir runs/bench] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cpsc_ray.config import load_config
from cpsc_ray.runs.in_process import run_in_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default="runs/bench-digits")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs = []
    for seed in args.seeds:
        cfg = load_config(
            args.config, [*args.overrides, f"seed={seed}", f"name=seed{seed}", f"output_dir={args.output_dir}"]
        )
        started = time.perf_counter()
        summary = run_in_process(cfg, progress=False)
        runs.append({"seed": seed, "wall_s": time.perf_counter() - started, **summary})
        print(json.dumps(runs[-1]), flush=True)
    teacher = runs[0]["teacher_test_acc"]
    last = [r["last"]["test_acc"] for r in runs]
    best = [r["best"]["test_acc"] for r in runs]
    line = lambda xs: f"{100 * statistics.mean(xs):.2f} +/- {100 * statistics.stdev(xs) if len(xs) > 1 else 0:.2f}"  # noqa: E731
    print(f"teacher test accuracy: {100 * teacher:.2f}%  ({len(runs)} seeds)")
    print(f"student test accuracy, last epoch:        {line(last)}  {[round(100 * x, 2) for x in last]}")
    print(f"student test accuracy, best by val_acc:   {line(best)}  {[round(100 * x, 2) for x in best]}")
    print(f"wall seconds per run: {[round(r['wall_s']) for r in runs]}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(runs, out, indent=2)


if __name__ == "__main__":
    main()
