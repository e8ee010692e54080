"""Checks and measures cpsc-ray on one GPU in under ten minutes, as one command (issue 13).

Made for a GPU machine lent for minutes, with Python and torch but no Ray (see README, "Checking a GPU
machine"). The steps, each a bounded subprocess, so that a failure or a hang is recorded and the rest
still run:

  1. ``pytest -m gpu``: tests/test_gpu.py (bf16 and channels_last epochs, no teacher gradients,
     deterministic continuation, a GPU-made probe set read on a CPU) and tests/test_step_equality.py (each
     speed-up, CUDA graphs included, gives the plain engine's losses and updates);
  2. step throughput, engine vs. the reference code's way (benchmarks/step_throughput.py): both pairs
     at batch 256 and 512, fp32, bf16 and bf16 + channels_last, with peak memory; then torch.compile
     with CUDA graphs (``mode="reduce-overhead"``) for one pair and batch, its compile time apart;
  3. model FLOP utilisation: one iteration's FLOPs counted on the CPU (benchmarks/step_flops.py) times
     the iterations per second of step 2, against the named bf16 peak and a measured matrix product;
  4. a 60-second CIFAR-100-shaped ``cpsc-ray distill`` (benchmarks/cifar_shaped_run.py).

After every step it writes gpu_check.json and gpu_check.md into --out (with every step's output in
gpu_check.log); it prints the summary at the end and exits 1 if any step failed.

    python benchmarks/gpu_check.py --out gpu-check                      # on the GPU machine
    python benchmarks/gpu_check.py --out /tmp/dry --device cpu --quick   # the dry run, a minute on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
RUN_PAIR = "resnet34-resnet18"  # the cifar100_resnet34_resnet18 config's pair, batch and precision
RUN_BATCH, RUN_VARIANT = 512, "engine bf16 channels_last"
PAPER_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16, on paper
THROUGHPUT_COMPILE = "throughput_compile.json"


@dataclass(frozen=True)
class Size:
    """How big each step is: the real measurement on a GPU, or the dry run's tiny one."""

    device: str
    pairs: tuple[str, ...]  # measured in step 2
    compile_pair: str
    batches: tuple[int, int]
    g_steps: int
    s_steps: int
    iterations: int
    variants: tuple[str, ...]
    compile_variant: str
    compile_backend: str
    compile_mode: str
    peak_size: int
    timeouts: dict[str, int]


FULL = Size(
    device="cuda",
    pairs=("resnet34-resnet18", "wrn_40_2-wrn_16_2"),
    # The launch-bound pair (3% MFU), where CUDA graphs should gain most; compiling the ResNet-34 pair's steps did
    # not end within 100 s on an H200 (2026-12-04), the WRN pair's smaller models compile sooner.
    compile_pair="wrn_40_2-wrn_16_2",
    batches=(256, 512),
    g_steps=6,
    s_steps=5,
    iterations=5,
    variants=("reference", "engine fp32", "engine bf16", "engine bf16 channels_last"),
    compile_variant="engine bf16 channels_last compile",
    compile_backend="inductor",
    compile_mode="reduce-overhead",  # CUDA graphs: the steps are launch-bound (issue 22)
    peak_size=8192,
    # Seconds per step, together under the device tool's 10-minute command limit. On an H200 (2026-12-04): pytest
    # 131 s from a cold compile cache, batch 256 six of its eight variants in 75 s (cuDNN's autotuning at the first
    # iteration), batch 512 64 s, the FLOP count 22 s, the run 109 s.
    timeouts={"pytest": 140, "throughput-256": 100, "throughput-512": 80, "compile": 110, "flops": 30, "run": 120},
)
QUICK = Size(
    device="cpu",
    pairs=("wrn_40_2-wrn_16_2",),  # the smaller pair; the run and the FLOP count take ResNet-34 too
    compile_pair="wrn_40_2-wrn_16_2",
    batches=(4, 8),
    g_steps=1,
    s_steps=1,
    iterations=1,
    variants=("reference", "engine fp32", "engine fp32 channels_last"),
    compile_variant="engine fp32 channels_last compile",
    compile_backend="aot_eager",  # Dynamo and AOTAutograd trace; Inductor: 49 s on 2 cores
    compile_mode="default",  # a mode is Inductor's: aot_eager takes none
    peak_size=1024,
    timeouts={"pytest": 60, "throughput-4": 45, "throughput-8": 45, "compile": 60, "flops": 45, "run": 60},
)


@dataclass
class Check:
    out: Path
    work: Path
    size: Size
    peak_tflops: float
    started: str
    commit: str | None
    machine: dict[str, Any]
    steps: list[dict[str, Any]]

    def path(self, name: str) -> Path:
        return self.work / name

    def read(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None


# ----- the steps ---------------------------------------------------------------------------------------


def pytest_step(check: Check) -> tuple[list[str], dict[str, str]]:
    env = {"CPSC_RAY_GPU_TESTS_DEVICE": "cpu"} if check.size.device == "cpu" else {}
    tests = ["tests/test_gpu.py", "tests/test_step_equality.py"]
    command = [sys.executable, "-m", "pytest", "-m", "gpu", *tests, "-q", "-rs", "-p", "no:cacheprovider"]
    return [*command, "-o", "junit_family=xunit1", f"--junitxml={check.path('pytest.xml')}"], env


def pytest_result(check: Check) -> dict[str, Any] | None:
    """Each test's outcome, its skip reason or failure, and the properties it recorded."""
    try:
        root = ET.parse(check.path("pytest.xml")).getroot()
    except (OSError, ET.ParseError):
        return None
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome, message = kind, (found.get("message") or found.text or "")[:600]
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests.append({"test": case.get("name"), "outcome": outcome, "message": message, **properties})
    return {"tests": tests}


def throughput_step(batch: int) -> Callable[[Check], tuple[list[str], dict[str, str]]]:
    def command(check: Check) -> tuple[list[str], dict[str, str]]:
        size = check.size
        command = throughput_command(check, batch, f"throughput_b{batch}.json")
        return [*command, "--pairs", *size.pairs, "--variants", *size.variants], {}

    return command


def throughput_command(check: Check, batch: int, json_name: str) -> list[str]:
    size = check.size
    return [
        sys.executable,
        str(BENCHMARKS / "step_throughput.py"),
        f"--device={size.device}",
        f"--batch={batch}",
        f"--g-steps={size.g_steps}",
        f"--s-steps={size.s_steps}",
        f"--iterations={size.iterations}",
        f"--json={check.path(json_name)}",
    ]


def compile_step(check: Check) -> tuple[list[str], dict[str, str]]:
    size = check.size
    command = throughput_command(check, size.batches[0], THROUGHPUT_COMPILE)
    compiled = ["--pairs", size.compile_pair, "--variants", size.compile_variant]
    backend = ["--compile-backend", size.compile_backend, "--compile-mode", size.compile_mode]
    return [*command, *compiled, *backend], {}


def flops_step(check: Check) -> tuple[list[str], dict[str, str]]:
    size = check.size
    return [
        sys.executable,
        str(BENCHMARKS / "step_flops.py"),
        "--batches",
        *map(str, size.batches),
        f"--g-steps={size.g_steps}",
        f"--s-steps={size.s_steps}",
        f"--peak-device={size.device}",
        f"--peak-size={size.peak_size}",
        f"--json={check.path('flops.json')}",
    ], {}


def run_step(check: Check) -> tuple[list[str], dict[str, str]]:
    command = [
        sys.executable,
        str(BENCHMARKS / "cifar_shaped_run.py"),
        f"--work={check.path('cifar-run')}",
        f"--json={check.path('run.json')}",
        f"--device={check.size.device}",
    ]
    if check.size.device == "cpu":
        return [*command, "--quick"], {}
    rate = next(
        (
            r["images_per_s"]
            for r in throughput_rows(check)
            if (r["pair"], r["batch"], r["variant"]) == (RUN_PAIR, RUN_BATCH, RUN_VARIANT) and "images_per_s" in r
        ),
        None,
    )
    return [*command, "--seconds=60", *([f"--images-per-s={rate:.0f}"] if rate else [])], {}


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    command: Callable[[Check], tuple[list[str], dict[str, str]]]
    result: Callable[[Check], Any] | None = None  # step 2's rows go to the report's throughput table instead


def steps_for(size: Size) -> list[Step]:
    throughput = [Step(f"throughput-{n}", f"2. step throughput, batch {n}", throughput_step(n)) for n in size.batches]
    return [
        Step("pytest", "1. pytest -m gpu", pytest_step, pytest_result),
        *throughput,
        Step("compile", "2. torch.compile, one pair", compile_step),
        Step("flops", "3. FLOPs per iteration, model FLOP utilisation", flops_step, lambda c: c.read("flops.json")),
        Step("run", "4. CIFAR-100-shaped cpsc-ray distill", run_step, lambda c: c.read("run.json")),
    ]


# ----- results -----------------------------------------------------------------------------------------


def throughput_rows(check: Check) -> list[dict[str, Any]]:
    """What step 2's step_throughput.py runs wrote (all they measured before a timeout, too), with their batch."""
    rows = []
    for name in [f"throughput_b{n}.json" for n in check.size.batches] + [THROUGHPUT_COMPILE]:
        measured = check.read(name) or {"results": []}
        rows += [{**r, "batch": measured["args"]["batch"]} for r in measured["results"]]
    return rows


def measured_rows(check: Check) -> list[dict[str, Any]]:
    """Every variant step 2 measured, with its speed-up over the reference at the same pair and batch, and
    its TFLOP/s and MFU once step 3 has counted the FLOPs: the reference is charged the engine's FLOPs."""
    rows = throughput_rows(check)
    reference = {
        (r["pair"], r["batch"]): r["images_per_s"] for r in rows if r["variant"] == "reference" and "error" not in r
    }
    flops = check.read("flops.json")
    measured_peak = ((flops or {}).get("matmul") or {}).get("tflops")
    for r in rows:
        if "error" in r:
            continue
        r["speedup_vs_reference"] = (
            r["images_per_s"] / reference[r["pair"], r["batch"]] if (r["pair"], r["batch"]) in reference else None
        )
        per_iteration = (flops or {}).get("iteration_flops", {}).get(r["pair"], {}).get(str(r["batch"]))
        if per_iteration is not None:
            r["tflops"] = (
                per_iteration * r["images_per_s"] / ((flops["g_steps"] + flops["s_steps"]) * r["batch"]) / 1e12
            )
            r["mfu_named"] = r["tflops"] / check.peak_tflops
            r["mfu_measured"] = r["tflops"] / measured_peak if measured_peak else None
    return rows


def machine() -> dict[str, Any]:
    import torch

    gpu = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True)
        gpu = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    return {
        "gpu": gpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
    }


def checkout_commit() -> str | None:
    """This checkout's commit, ``-dirty`` when it has changes; None where there is no git (a copied tree)."""
    if not shutil.which("git"):
        return None
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return None
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def summary(check: Check) -> dict[str, Any]:
    return {
        "started": check.started,
        "commit": check.commit,
        "machine": check.machine,
        "device": check.size.device,
        "peak_tflops": {"named": check.peak_tflops, "measured": ((check.read("flops.json") or {}).get("matmul"))},
        "steps": check.steps,
        "throughput": measured_rows(check),
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# cpsc-ray GPU check, {report['started']}",
        "",
        f"Machine: {m['gpu'] or 'no GPU'}; {m['cpus']} CPUs; Python {m['python']}, torch {m['torch']} "
        f"(CUDA {m['cuda']}); measured on {report['device']}; commit {report['commit'] or 'not named'}.",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
        *(f"| {s['title']} | {s['status']} | {s['seconds']:.0f} |" for s in report["steps"]),
    ]
    by_key = {s["key"]: s for s in report["steps"]}
    lines += tests_section((by_key.get("pytest", {}).get("result") or {}).get("tests", []))
    lines += throughput_section(report)
    lines += run_section(by_key.get("run", {}).get("result"))
    failed = [s for s in report["steps"] if s["status"] != "ok"]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- {s['title']}: {s['status']}:\n\n```\n{s.get('error', '')[-1500:]}\n```" for s in failed]
    return "\n".join(lines) + "\n"


def tests_section(tests: list[dict[str, Any]]) -> list[str]:
    if not tests:
        return []
    lines = ["", "## 1. pytest -m gpu", "", "| test | outcome | note |", "|---|---|---|"]
    for t in tests:
        note = t["message"].replace("|", "/").replace("\n", " ")[:200]
        if t.get("nondeterministic_ops"):
            note = f"operations without a deterministic kernel: {t['nondeterministic_ops']}. {note}"
        if t.get("measured"):
            note = f"measured: {t['measured']}. {note}"
        lines.append(f"| {t['test']} | {t['outcome']} | {note} |")
    return lines


def throughput_section(report: dict[str, Any]) -> list[str]:
    rows = report["throughput"]
    if not rows:
        return []
    measured = report["peak_tflops"]["measured"]
    against = f"{report['peak_tflops']['named']:g} TFLOP/s (the named dense bf16 peak)"
    if measured:
        against += f" and against {measured['tflops']:.3g} TFLOP/s ({measured['dtype']} matrix product measured here)"
    lines = [
        "",
        "## 2-3. Images per second, engine vs. the reference code's way; model FLOP utilisation",
        "",
        f"MFU against {against}. Warm-up: the untimed first iteration (cuDNN autotuning; compilation).",
        "",
        "| pair | batch | variant | images/s | x ref. | peak GiB | warm-up s | TFLOP/s | MFU named | MFU measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['pair']} | {r['batch']} | {r['variant']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:120]} | | | | | | |")
            continue
        cells = [
            f"{r['images_per_s']:,.0f}",
            number(r.get("speedup_vs_reference"), ".2f"),
            number(r.get("peak_gib"), ".1f"),
            number(r["warmup_s"], ".1f"),
            number(r.get("tflops"), ".1f"),
            number(r.get("mfu_named"), ".1%"),
            number(r.get("mfu_measured"), ".1%"),
        ]
        lines.append(f"{head} {' | '.join(cells)} |")
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("speedup_vs_reference") and r["variant"] != "reference":
            key = r["pair"], r["batch"]
            best[key] = max(best.get(key, r), r, key=lambda x: x["speedup_vs_reference"])
    if best:
        lines += ["", "The goal is 2x the reference's images/s. Fastest engine variant of each pair and batch:", ""]
        for (pair, batch), r in best.items():
            verdict = "met" if r["speedup_vs_reference"] >= 2 else "not met"
            lines.append(f"- {pair}, batch {batch}: {r['variant']}, x{r['speedup_vs_reference']:.2f} ({verdict})")
    flops = next((s["result"] for s in report["steps"] if s["key"] == "flops" and s.get("result")), None)
    if flops:
        lines += ["", "FLOPs of one iteration (G + S steps), counted on the CPU:", ""]
        for pair, by_batch in flops["iteration_flops"].items():
            lines.append(f"- {pair}: " + ", ".join(f"batch {n}: {f / 1e12:.2f} TFLOP" for n, f in by_batch.items()))
    return lines


def run_section(run: dict[str, Any] | None) -> list[str]:
    if not run:
        return []
    return [
        "",
        "## 4. CIFAR-100-shaped cpsc-ray distill",
        "",
        f"{run['images_per_s']:,.0f} images/s, {run['epoch_s']:.2f} s per epoch of {run['images_per_epoch']:,} "
        f"images (median after the first, which took {run['first_epoch_s']:.2f} s); {run['epochs']} epochs, "
        f"{run['training_s']:.0f} s training in {run['wall_s']:.0f} s wall.",
        "",
        f"`{run['command']}`",
    ]


def number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def save(check: Check) -> None:
    report = summary(check)
    (check.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (check.out / "gpu_check.md").write_text(markdown(report))


# ----- running -----------------------------------------------------------------------------------------


def run_bounded(command: list[str], env: dict[str, str], timeout: int, log: Path) -> tuple[str, str]:
    """Runs ``command`` in its own process group, killed whole at ``timeout``; returns (status, output tail)."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", **env}
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        start = out.tell()
        process = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            status = "ok" if process.wait(timeout=timeout) == 0 else f"failed (exit {process.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"timeout after {timeout} s"
    with open(log) as read:
        read.seek(start)
        return status, read.read()[-3000:]


def run_steps(check: Check, steps: list[Step]) -> None:
    """Each step in turn, bounded by its timeout; the summary is rewritten after every one."""
    for step in steps:
        command, env = step.command(check)
        began = time.perf_counter()
        status, tail = run_bounded(command, env, check.size.timeouts[step.key], check.out / "gpu_check.log")
        record = {
            "key": step.key,
            "title": step.title,
            "status": status,
            "seconds": time.perf_counter() - began,
            "command": " ".join(command),
        }
        if step.result:
            record["result"] = step.result(check)
        if status != "ok":
            record["error"] = tail
        check.steps.append(record)
        save(check)
        print(f"{step.title}: {status} ({record['seconds']:.0f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for gpu_check.json, .md and .log")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="every step at a tiny size (the dry run)")
    parser.add_argument("--peak-tflops", type=float, default=PAPER_PEAK_TFLOPS, help="the dense bf16 peak to name")
    parser.add_argument("--work", help="scratch directory for data, runs and step files (default: a temporary one)")
    parser.add_argument("--commit", help="the commit measured (default: this checkout's, where git knows it)")
    args = parser.parse_args()
    if args.device == "cuda" and args.quick:
        parser.error("--quick is the dry run on the CPU: use it with --device cpu")
    if args.device == "cpu" and not args.quick:
        parser.error("the full check measures a GPU: on a CPU, run the dry run (--device cpu --quick)")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible here (nvidia-smi lists the GPUs): run it on the GPU machine")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.log").write_text("")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    size = QUICK if args.quick else FULL
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    check = Check(out, work, size, args.peak_tflops, started, args.commit or checkout_commit(), machine(), [])
    run_steps(check, steps_for(size))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + (out / "gpu_check.md").read_text())
    return 0 if all(s["status"] == "ok" for s in check.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
