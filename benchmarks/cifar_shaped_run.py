"""A CIFAR-100-shaped distillation through ``cpsc-ray distill`` with the ``cifar100_resnet34_resnet18``
config (its models, batch, steps and bf16), timed: images/s and seconds per epoch as the run records them.

No data set or trained teacher is needed: the teacher is randomly initialised (speed does not depend on
its weights), and the script writes random images in CIFAR-100's on-disk format (``cifar-100-python/``
pickles), as the tests write theirs. torchvision checks those files against the real set's MD5s, so this
script turns that check off in its own process, as torchvision's own tests do; cpsc-ray has no flag for it.

The number of epochs is chosen to fill ``--seconds`` of training at ``--images-per-s`` (a rate measured
before, e.g. by step_throughput.py); the run also pays its set-up (data, probe set) and evaluations.

    python benchmarks/cifar_shaped_run.py --work /tmp/cifar-run --seconds 60 --images-per-s 15000 --json run.json
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets.cifar
from safetensors.torch import save_file

from cpsc_ray.cli import main as cpsc_ray_cli
from cpsc_ray.config import load_config
from cpsc_ray.method.models import build_model
from cpsc_ray.results.tables import read_results

CONFIG = "cifar100_resnet34_resnet18"
NAME = "cifar-shaped"
# A few of everything, for the dry run: the same code path at a size a CPU finishes in seconds.
QUICK = [
    "train.batch_size=8",
    "train.iterations_per_epoch=1",
    "train.g_steps=1",
    "train.s_steps=1",
    "eval.probe_per_class=1",
    "eval.probe_steps=2",
    "data.val_size=20",
    "data.num_workers=0",
]


def write_cifar100(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """Random images in CIFAR-100's on-disk layout: rows of 1024 red, 1024 green, 1024 blue bytes."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        rows = {
            "data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
            "fine_labels": [i % 100 for i in range(count)],
            "coarse_labels": [i % 20 for i in range(count)],
        }
        with open(folder / split, "wb") as out:
            pickle.dump(rows, out, protocol=4)
    names = {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    with open(folder / "meta", "wb") as out:
        pickle.dump(names, out, protocol=4)
    return root


def random_teacher(path: Path, arch: str) -> Path:
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in build_model(arch, 100).state_dict().items()}, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="directory for the data, the teacher and the run")
    parser.add_argument("--seconds", type=float, default=60.0, help="training time to fill")
    parser.add_argument("--images-per-s", type=float, help="expected rate, to size the epochs (default: 3 epochs)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a tiny run of the same path (the dry run)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    overrides = QUICK if args.quick else []
    cfg = load_config(CONFIG, overrides)
    write_cifar100(work / "data", *((60, 40) if args.quick else (50_000, 10_000)))
    teacher = random_teacher(work / "teacher.safetensors", cfg.teacher.arch)
    images_per_epoch = cfg.train.iterations_per_epoch * (cfg.train.g_steps + cfg.train.s_steps) * cfg.train.batch_size
    epochs = 2 if args.quick else 3
    if args.images_per_s and not args.quick:
        epochs = max(2, min(100, round(args.seconds * args.images_per_s / images_per_epoch)))
    argv = [
        "distill",
        "--config",
        CONFIG,
        "--storage",
        str(work / "runs"),
        "--name",
        NAME,
        *overrides,
        f"data.root={work / 'data'}",
        f"teacher.weights={teacher}",
        f"train.epochs={epochs}",
        f"train.device={args.device}",
    ]
    torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True  # random files, not the real set
    started = time.perf_counter()
    exit_code = cpsc_ray_cli(argv)
    wall_s = time.perf_counter() - started
    if exit_code:
        raise SystemExit(f"cpsc-ray {' '.join(argv)} exited with {exit_code}")

    rows = read_results([str(work / "runs")]).epochs.sort_values("epoch")
    steady = rows.iloc[1:] if len(rows) > 1 else rows  # the first epoch pays cuDNN's autotuning
    result = {
        "command": "cpsc-ray " + " ".join(argv),
        "epochs": int(len(rows)),
        "images_per_epoch": images_per_epoch,
        "batch_size": cfg.train.batch_size,
        "amp": cfg.train.amp,
        "channels_last": cfg.train.channels_last,
        "images_per_s": float(steady["images_per_s"].median()),
        "epoch_s": float(steady["epoch_s"].median()),
        "first_epoch_s": float(rows["epoch_s"].iloc[0]),
        "training_s": float(rows["epoch_s"].sum()),
        "wall_s": wall_s,  # set-up, probe set, evaluations, checkpoints and the report included
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
