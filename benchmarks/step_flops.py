"""FLOPs of one CPSC-DFKD iteration, and the bf16 matrix-product rate a device reaches, for model FLOP
utilisation (MFU): FLOPs per iteration x iterations per second / peak.

The count is made once, eagerly and on the CPU, by ``torch.utils.flop_counter.FlopCounterMode`` around
one real engine iteration (G generator steps, then S student steps): the forward and backward of every
model as it runs, so the frozen teacher's backward counts only the input gradients it computes. Matrix
products and convolutions are counted; element-wise work is not (the usual MFU convention).

Counting at the measured batch would take minutes on a CPU, so it is counted at two small batches
and extended: the convolutions and linear layers grow with the batch, the contrastive loss's
similarity matrix with its square, so ``a*N + b*N**2`` through the two counts is exact at any ``N``.

    python benchmarks/step_flops.py --batches 256 512 --peak-device cuda --json flops.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from step_throughput import CLASSES, PAIRS, SPEC, run_config
from torch.utils.flop_counter import FlopCounterMode

from cpsc_ray.method.engine import DistillEngine
from cpsc_ray.method.models import build_model

COUNT_BATCHES = (4, 8)


def counted_flops(teacher: str, student: str, batch: int, g_steps: int, s_steps: int) -> int:
    """FLOPs of one iteration at ``batch``, counted as it runs on the CPU in fp32."""
    args = argparse.Namespace(device="cpu", batch=batch, g_steps=g_steps, s_steps=s_steps)
    cfg = run_config(teacher, student, args, amp=False, channels_last=False, compile=False)
    engine = DistillEngine(cfg, build_model(teacher, CLASSES), SPEC, device=torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        engine.train_epoch()
    return counter.get_total_flops()


def iteration_flops(teacher: str, student: str, batches: list[int], g_steps: int, s_steps: int) -> dict[int, int]:
    """FLOPs of one iteration at each batch size, from the counts at COUNT_BATCHES."""
    (n1, f1), (n2, f2) = ((n, counted_flops(teacher, student, n, g_steps, s_steps)) for n in COUNT_BATCHES)
    quadratic = (f2 * n1 - f1 * n2) / (n1 * n2 * (n2 - n1))
    linear = f1 / n1 - quadratic * n1
    return {n: round(linear * n + quadratic * n * n) for n in batches}


def matmul_tflops(device: torch.device, size: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """The rate of a square matrix product on ``device``: the peak that the models' work is compared with."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--g-steps", type=int, default=6)
    parser.add_argument("--s-steps", type=int, default=5)
    parser.add_argument("--peak-device", choices=["cpu", "cuda"], help="also time a matrix product there")
    parser.add_argument("--peak-size", type=int, default=8192, help="side of the timed square matrices")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    started = time.perf_counter()
    flops = {pair: iteration_flops(*PAIRS[pair], args.batches, args.g_steps, args.s_steps) for pair in args.pairs}
    result = {
        "g_steps": args.g_steps,
        "s_steps": args.s_steps,
        "count_batches": list(COUNT_BATCHES),
        "count_s": time.perf_counter() - started,
        "iteration_flops": {pair: {str(n): f for n, f in by_batch.items()} for pair, by_batch in flops.items()},
    }
    for pair, by_batch in flops.items():
        for n, f in by_batch.items():
            print(f"{pair:20s} batch {n:5d}: {f / 1e12:8.3f} TFLOP per iteration ({f / n / 1e9:.2f} GFLOP per image)")
    if args.peak_device:
        device = torch.device(args.peak_device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        result["matmul"] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."),
            "size": args.peak_size,
            "tflops": matmul_tflops(device, args.peak_size, dtype),
        }
        print(
            f"{result['matmul']['dtype']} {args.peak_size}^3 matrix product: {result['matmul']['tflops']:.1f} TFLOP/s"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
