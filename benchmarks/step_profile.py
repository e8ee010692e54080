"""Where one CPSC-DFKD iteration's time goes: ``torch.profiler`` over whole engine iterations, by phase and by
operator.

The engine labels its work (``torch.profiler.record_function``): each synthesis and student step, within them the
generator's, the teacher's and the student's forward passes, every loss term (``loss/<name>``), the backward pass
and the optimizer step. This script runs the step-throughput harness's configuration (``step_throughput.py``: 100
classes, 32 px, all loss terms on, channels_last; fp32, or bf16 with ``--amp``) for one warm-up and
``--iterations`` profiled iterations, then prints

- by phase: each label's total time (children included) and its share of the profiled wall time;
- by operator: the operators with the most self time (convolutions, batch norm, element-wise work).

The profiler costs time of its own, and more in the generator's steps (where autograd records the teacher's and
the student's forwards) than in the student's. ``--direct`` times the same iterations without it: each step, and
each forward of the teacher and the student, by ``time.perf_counter`` around the call.

    python benchmarks/step_profile.py                                  # CPU, 2 threads, both pairs
    python benchmarks/step_profile.py --pairs resnet34-resnet18 --json profile.json
    python benchmarks/step_profile.py --direct                         # seconds per call, no profiler
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from step_throughput import PAIRS, add_step_args, warm_engine
from torch.profiler import ProfilerActivity, profile

STEPS = ("synthesis_step", "student_step")
LABELS = ("sample", "generator_forward", "teacher_forward", "student_forward", "backward", "optimizer")


def phase_times(events) -> dict[str, float]:
    """Seconds under each step label and, by ``<step>/<label>``, under each label inside a step; ``<step>/loss``
    sums the step's loss terms."""
    totals: dict[str, float] = {}
    for event in events:
        if event.name in STEPS:
            key = event.name
        elif event.name in LABELS or event.name.startswith("loss/"):
            step = _enclosing_step(event)
            if step is None:
                continue
            key = f"{step}/{event.name}"
            if event.name.startswith("loss/"):
                totals[f"{step}/loss"] = totals.get(f"{step}/loss", 0.0) + event.time_range.elapsed_us() / 1e6
        else:
            continue
        totals[key] = totals.get(key, 0.0) + event.time_range.elapsed_us() / 1e6
    return totals


def _enclosing_step(event) -> str | None:
    parent = event.cpu_parent
    while parent is not None and parent.name not in STEPS:
        parent = parent.cpu_parent
    return parent.name if parent is not None else None


def profile_pair(teacher: str, student: str, args: argparse.Namespace) -> dict:
    engine, _ = warm_engine(teacher, student, args, amp=args.amp, channels_last=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        engine.train_epoch()
    wall = time.perf_counter() - started
    phases = phase_times(prof.events())
    operators = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
    profiled = sum(a.self_cpu_time_total for a in operators) / 1e6
    return {
        "pair": f"{teacher}-{student}",
        "wall_s": wall,
        "phases_s": phases,
        "operators": [
            {"name": a.key, "self_s": a.self_cpu_time_total / 1e6, "calls": a.count} for a in operators[: args.top]
        ],
        "operators_total_s": profiled,
    }


def time_directly(teacher: str, student: str, args: argparse.Namespace) -> dict:
    """Seconds per call without the profiler: each generator step (``synthesize``), each student step (the rest of
    the iteration, shared evenly) and, in each kind of step, the teacher's and the student's forwards (module
    hooks)."""
    engine, _ = warm_engine(teacher, student, args, amp=args.amp, channels_last=True)
    step, began = ["student_step"], {}
    calls: dict[str, list[float]] = defaultdict(list)
    synthesize = engine.synthesizer.synthesize

    def synthesis_step():
        step[0], started = "synthesis_step", time.perf_counter()
        try:
            return synthesize()
        finally:
            calls["synthesis_step"].append(time.perf_counter() - started)
            step[0] = "student_step"

    engine.synthesizer.synthesize = synthesis_step
    for label, model in (("teacher_forward", engine.teacher), ("student_forward", engine.student)):
        model.register_forward_pre_hook(lambda _m, _a, label=label: began.__setitem__(label, time.perf_counter()))
        model.register_forward_hook(
            lambda _m, _a, _o, label=label: calls[f"{step[0]}/{label}"].append(time.perf_counter() - began[label])
        )
    started = time.perf_counter()
    engine.train_epoch()
    wall = time.perf_counter() - started
    student_steps = args.iterations * args.s_steps
    calls["student_step"] = [(wall - sum(calls["synthesis_step"])) / student_steps] * student_steps
    per_call = {name: {"calls": len(times), "mean_s": sum(times) / len(times)} for name, times in calls.items()}
    return {"pair": f"{teacher}-{student}", "wall_s": wall, "per_call": per_call}


def print_direct(result: dict) -> None:
    print(f"\n{result['pair']}: {result['wall_s']:.1f} s, no profiler")
    for name, timing in sorted(result["per_call"].items()):
        indent = "  " * name.count("/")
        print(f"  {indent}{name.rsplit('/', 1)[-1]:28s} {timing['mean_s']:8.3f} s a call  ({timing['calls']} calls)")


def print_profile(result: dict) -> None:
    wall = result["wall_s"]
    print(f"\n{result['pair']}: {wall:.1f} s profiled")
    for name, seconds in sorted(result["phases_s"].items()):
        indent = "  " * name.count("/")
        print(f"  {indent}{name.rsplit('/', 1)[-1]:28s} {seconds:8.2f} s  {100 * seconds / wall:5.1f}%")
    print("  operators by self time:")
    for op in result["operators"]:
        share = 100 * op["self_s"] / result["operators_total_s"]
        print(f"    {op['name']:48s} {op['self_s']:8.2f} s  {share:5.1f}%  ({op['calls']} calls)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(parser, 1, "profiled iterations, after one warm-up")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (train.amp)")
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--direct", action="store_true", help="time each step and forward without the profiler")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    measure, show = (time_directly, print_direct) if args.direct else (profile_pair, print_profile)
    results = []
    for pair in args.pairs:
        results.append(measure(*PAIRS[pair], args))
        show(results[-1])
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
