"""Synthetic images per second through full CPSC-DFKD iterations, engine vs. the reference code's way.

An iteration is G generator steps then S student steps; it synthesises (G + S) x batch images.
All loss terms are on (METHOD.md weights), 100 classes, 32x32, randomly initialised models (speed
does not depend on the weights).

``reference`` repeats the reference code's per-step work with the same models and loss terms:
weight gradients for the frozen teacher and for the student in generator steps, a new Adam
optimiser (over the generator and ``z``) in every generator step, an autograd graph built for the
generator output that student steps then detach, its BN-statistics hook (a permuted copy of every
BN input for the variance), NCHW tensors, and fp16 autocast with a GradScaler on CUDA (as its
``--use_amp`` runs). ``engine`` is cpsc-ray's DistillEngine, in NCHW and in channels_last.

The reference emulation is frozen as of issue 13 (2026-11-27): every speed-up in BENCHMARKS.md is
measured against this same code, so do not change it; fix only what stops it running.

Each result also gives ``warmup_s``, the untimed first iteration: cuDNN autotuning, and for the
``compile`` variant torch.compile's compilation, which is why it is kept apart from the rate
(``warmups_s``: every repeat's, in the order measured; only the first compiles with a cold cache).

    python benchmarks/step_throughput.py                       # CPU, 2 threads, both pairs
    python benchmarks/step_throughput.py --device cuda --iterations 20
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import time
from typing import NamedTuple

import torch
from torch import nn

from cpsc_ray.config import Config, with_values
from cpsc_ray.method.engine import DistillEngine
from cpsc_ray.method.generators import build_generator
from cpsc_ray.method.losses import (
    BNStatisticsPrior,
    SynthBatch,
    generator_objective,
    student_objective,
)
from cpsc_ray.method.models import build_model
from cpsc_ray.method.spec import ImageSpec

CPU_DEFAULT_VARIANTS = ("reference", "engine fp32", "engine fp32 channels_last", "engine bf16 channels_last")
PAIRS = {"resnet34-resnet18": ("resnet34", "resnet18"), "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2")}
CLASSES, SIZE = 100, 32
SPEC = ImageSpec(CLASSES, 3, SIZE, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def run_config(teacher: str, student: str, args: argparse.Namespace, **train) -> Config:
    return with_values(
        Config(),
        {
            "teacher.arch": teacher,
            "student.arch": student,
            "train.device": args.device,
            "train.batch_size": args.batch,
            "train.g_steps": args.g_steps,
            "train.s_steps": args.s_steps,
            "train.iterations_per_epoch": 1,
            "train.epochs": 1000,
            **{f"train.{k}": v for k, v in train.items()},
        },
    )


class Measurement(NamedTuple):
    images_per_s: float
    warmup_s: float


def warm_engine(teacher: str, student: str, args: argparse.Namespace, **train) -> tuple[DistillEngine, float]:
    """An engine of the pair after one untimed warm-up iteration (allocator, cudnn autotuning, compilation), set to
    run ``args.iterations`` per epoch; and the warm-up's seconds."""
    cfg = run_config(teacher, student, args, **train)
    engine = DistillEngine(cfg, build_model(teacher, CLASSES), SPEC, device=torch.device(args.device))
    warmup_s = engine.train_epoch()["epoch_s"]
    engine.apply_hyperparameters(with_values(cfg, {"train.iterations_per_epoch": args.iterations}))
    return engine, warmup_s


def engine_images_per_s(teacher: str, student: str, args: argparse.Namespace, **train) -> Measurement:
    engine, warmup_s = warm_engine(teacher, student, args, **train)
    return Measurement(engine.train_epoch()["images_per_s"], warmup_s)


def add_step_args(parser: argparse.ArgumentParser, iterations: int, iterations_help: str) -> None:
    """The options that say which iteration is measured, shared with step_profile.py."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--g-steps", type=int, default=6)
    parser.add_argument("--s-steps", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=iterations, help=iterations_help)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")


class ReferenceBNPrior(BNStatisticsPrior):
    """The reference code's DeepInversion hook: mean, then a permuted contiguous copy for the variance."""

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self._recording:
            x = inputs[0]
            channels = x.shape[1]
            var = x.permute(1, 0, 2, 3).contiguous().view(channels, -1).var(1, unbiased=False)
            self._means.append(x.mean([0, 2, 3]))
            self._mean_squares.append(var + self._means[-1] ** 2)


def reference_images_per_s(teacher_name: str, student_name: str, args: argparse.Namespace) -> Measurement:
    device = torch.device(args.device)
    cfg = run_config(teacher_name, student_name, args)
    teacher = build_model(teacher_name, CLASSES).to(device).eval()  # parameters still require grad
    student = build_model(student_name, CLASSES).to(device).train()
    generator = build_generator("upsample", cfg.generator.nz, cfg.generator.ngf, 3, SIZE, CLASSES).to(device)
    head = None
    if student.feature_dim != teacher.feature_dim:
        head = nn.Sequential(
            nn.Linear(student.feature_dim, student.feature_dim),
            nn.ReLU(),
            nn.Linear(student.feature_dim, teacher.feature_dim),
        ).to(device)
    prior = ReferenceBNPrior(teacher)
    g_loss, s_loss = generator_objective(cfg.loss, prior), student_objective(cfg.loss)
    student_opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    on_cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if on_cuda else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if on_cuda else contextlib.nullcontext

    def backward_step(loss, optimizer):
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    def iteration():
        for _ in range(args.g_steps):
            z = nn.Parameter(torch.randn(args.batch, cfg.generator.nz, device=device))
            y = torch.randint(0, CLASSES, (args.batch,), device=device)
            optimizer = torch.optim.Adam(
                [{"params": generator.parameters()}, {"params": [z]}], 1e-3, betas=(0.5, 0.999)
            )
            optimizer.zero_grad()
            with autocast():
                images = generator(z, y)
                with prior.capture():
                    t_logits, t_features = teacher(images, return_features=True)
                s_logits, s_features = student(images, return_features=True)
                s_features = head(s_features) if head is not None else s_features
                total, _ = g_loss(SynthBatch(y, t_logits, s_logits, t_features, s_features))
            backward_step(total, optimizer)
        for _ in range(args.s_steps):
            z = nn.Parameter(torch.randn(args.batch, cfg.generator.nz, device=device))
            y = torch.randint(0, CLASSES, (args.batch,), device=device)
            student_opt.zero_grad()
            with autocast():
                images = generator(z, y).detach()
                with torch.no_grad():
                    t_logits = teacher(images)
                total, _ = s_loss(SynthBatch(y, t_logits, student(images)))
            backward_step(total, student_opt)

    def timed(iterations: int) -> float:
        started = time.perf_counter()
        for _ in range(iterations):
            iteration()
        if on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    warmup_s = timed(1)
    images = args.iterations * (args.g_steps + args.s_steps) * args.batch
    return Measurement(images / timed(args.iterations), warmup_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(parser, 2, "timed iterations, after one warm-up")
    parser.add_argument("--repeats", type=int, default=1, help="repeat each measurement; the median is kept")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--variants", nargs="+", help="measure only these variants (default: all for the device)")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile's backend for the compile variant (aot_eager: Dynamo and AOTAutograd trace as they "
        "would, without Inductor's code generation, which takes a minute on a CPU)",
    )
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="train.compile_mode for the compile variants (reduce-overhead: CUDA graphs on CUDA)",
    )
    args = parser.parse_args()
    if args.compile_backend != "inductor":  # the engine calls torch.compile with the default backend
        torch.compile = functools.partial(torch.compile, backend=args.compile_backend)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True

    variants = {
        "reference": lambda t, s: reference_images_per_s(t, s, args),
        "engine fp32": lambda t, s: engine_images_per_s(t, s, args, amp=False, channels_last=False),
        "engine fp32 channels_last": lambda t, s: engine_images_per_s(t, s, args, amp=False, channels_last=True),
        "engine fp32 channels_last compile": lambda t, s: engine_images_per_s(
            t, s, args, amp=False, channels_last=True, compile=True, compile_mode=args.compile_mode
        ),
        "engine bf16": lambda t, s: engine_images_per_s(t, s, args, amp=True, channels_last=False),
        "engine bf16 channels_last": lambda t, s: engine_images_per_s(t, s, args, amp=True, channels_last=True),
        "engine bf16 channels_last compile": lambda t, s: engine_images_per_s(
            t, s, args, amp=True, channels_last=True, compile=True, compile_mode=args.compile_mode
        ),
    }
    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            parser.error(f"unknown variants {unknown}; on {args.device} they are {list(variants)}")
        variants = {name: measure for name, measure in variants.items() if name in args.variants}
    elif args.device == "cpu":  # compile measured only when named: Inductor compiles for minutes on a CPU
        variants = {name: measure for name, measure in variants.items() if name in CPU_DEFAULT_VARIANTS}
    machine = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    )
    results = []

    def save() -> None:  # after every variant, so that a run stopped at a time limit keeps what it measured
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"machine": machine, "args": vars(args), "results": results}, out, indent=2)

    # Every reference first: an engine leaves process-wide settings behind (keep_freed_host_memory) that the
    # reference code's way does not have.
    order = [(p, v) for v in variants if v == "reference" for p in args.pairs]
    order += [(p, v) for p in args.pairs for v in variants if v != "reference"]
    for pair, variant in order:
        measure = variants[variant]
        teacher, student = PAIRS[pair]
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            repeats = [measure(teacher, student) for _ in range(args.repeats)]
            samples = sorted(repeats)  # by images/s
        except Exception as err:  # a variant the device refuses (compile, bf16) must not hide the others
            results.append({"pair": pair, "variant": variant, "error": f"{type(err).__name__}: {err}"})
            print(f"{pair:20s} {variant:36s} FAILED {results[-1]['error'][:300]}", flush=True)
            continue
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        results.append(
            {
                "pair": pair,
                "variant": variant,
                "images_per_s": samples[len(samples) // 2].images_per_s,
                "warmup_s": samples[len(samples) // 2].warmup_s,
                "samples": [m.images_per_s for m in samples],
                "warmups_s": [m.warmup_s for m in repeats],  # the first is a cold compile, later ones hit its cache
                "peak_gib": peak_gib,
            }
        )
        save()
        memory = f"  peak {peak_gib:.2f} GiB" if peak_gib is not None else ""
        rate = results[-1]["images_per_s"]
        warmup = results[-1]["warmup_s"]
        print(f"{pair:20s} {variant:36s} {rate:10.1f} images/s{memory}  warm-up {warmup:.1f} s", flush=True)
    for pair in args.pairs:
        measured = [r for r in results if r["pair"] == pair and "images_per_s" in r]
        reference = next((r["images_per_s"] for r in measured if r["variant"] == "reference"), None)
        for r in measured:
            r["speedup_vs_reference"] = r["images_per_s"] / reference if reference else float("nan")
    save()
    print(
        f"machine: {machine}; batch {args.batch}, G {args.g_steps}, S {args.s_steps}, "
        f"{args.iterations} timed iterations"
    )
    for r in sorted(results, key=lambda r: args.pairs.index(r["pair"])):
        if "error" in r:
            print(f"  {r['pair']:20s} {r['variant']:36s} failed")
        else:
            speedup = r["speedup_vs_reference"]
            print(f"  {r['pair']:20s} {r['variant']:36s} {r['images_per_s']:9.1f} img/s  x{speedup:.2f}")


if __name__ == "__main__":
    main()
