"""The cost of the Ray Train layer: one digits budget run in-process, through Ray Train with 1 worker,
and with 2 workers (gloo, CPU). Cluster start (``ray.init``) is excluded: it is paid once per job.

Reported per mode: wall seconds of the whole run (setup, worker-group start, training, evaluation,
outputs), the training seconds the engine measured (sum of epoch times), and the per-epoch overhead
against in-process: (wall - wall_in_process) / epochs.

    python benchmarks/ray_overhead.py [--epochs 4] [key=value ...]
    python benchmarks/ray_overhead.py --gpus 1 train.batch_size=512     # one GPU: in-process vs 1 worker
"""

from __future__ import annotations

import argparse
import json
import time

import pyarrow.parquet as pq
import ray
import torch

from cpsc_ray.cluster.train import run_distributed
from cpsc_ray.config import load_config
from cpsc_ray.runs.in_process import run_in_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--storage", default="runs/ray-overhead")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs to use, one per worker (0: 2 CPU cores, gloo)")
    parser.add_argument("--json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.gpus:
        ray.init(num_gpus=args.gpus, include_dashboard=True)
        modes = [("in-process", 0), *((f"ray-train-{n}", n) for n in range(1, args.gpus + 1))]
    else:
        torch.set_num_threads(2)
        ray.init(num_cpus=2, include_dashboard=True)
        modes = [("in-process", 0), ("ray-train-1", 1), ("ray-train-2", 2)]
    overrides = [f"train.epochs={args.epochs}", f"output_dir={args.storage}", *args.overrides]
    results = {}
    for mode, workers in modes:
        cfg = load_config("digits", [*overrides, f"name={mode}"])
        started = time.perf_counter()
        if workers:
            if args.gpus:
                summary = run_distributed(cfg, workers, gpus_per_worker=1)
            else:
                summary = run_distributed(cfg, workers, cpus_per_worker=2 / workers)
        else:
            summary = run_in_process(cfg, progress=False)
        wall = time.perf_counter() - started
        rows = pq.read_table(f"{summary['run_dir']}/metrics.parquet").to_pylist()
        results[mode] = {
            "wall_s": wall,
            "train_s": sum(r["epoch_s"] for r in rows),
            "images_per_s": sum(r["epoch_images"] for r in rows) / sum(r["epoch_s"] for r in rows),
            "test_acc": rows[-1]["test_acc"],
        }
    base = results["in-process"]["wall_s"]
    print(f"digits, {args.epochs} epochs, {f'{args.gpus} GPU(s)' if args.gpus else '2 CPU cores'}; ray.init excluded")
    for mode, r in results.items():
        r["ratio"] = r["wall_s"] / base
        r["overhead_per_epoch_s"] = (r["wall_s"] - base) / args.epochs
        print(
            f"  {mode:12s} wall {r['wall_s']:7.1f} s  train {r['train_s']:7.1f} s  {r['images_per_s']:7.0f} img/s  "
            f"x{r['ratio']:.2f}  overhead/epoch {r['overhead_per_epoch_s']:+.1f} s  test {100 * r['test_acc']:.1f}%"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
