"""benchmarks/gpu_check.py's dry run (every step at a tiny size on the CPU), so that the script a GPU
machine runs cannot rot; and what it promises: bounded steps, a failure recorded while the rest run,
a summary written after every step, an exact FLOP count at any batch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402
import step_flops  # noqa: E402


def test_the_dry_run_runs_every_step_and_reports_each(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--out", str(out), "--work", str(work)]
    done = subprocess.run([*command, "--device", "cpu", "--quick"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    # The commit measured, from this checkout's git (a copy without git names it with --commit).
    head = subprocess.run(
        ["git", "-C", str(BENCHMARKS), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    assert report["commit"].removesuffix("-dirty") == head.stdout.strip()
    assert f"commit {report['commit']}." in (out / "gpu_check.md").read_text()
    steps = {s["key"]: s for s in report["steps"]}
    assert list(steps) == ["pytest", "throughput-4", "throughput-8", "compile", "flops", "run"]
    assert all(s["status"] == "ok" for s in steps.values())

    outcomes = {t["test"]: t["outcome"] for t in steps["pytest"]["result"]["tests"]}
    # The Ray-on-GPU test skips, and the six CUDA cases of test_step_equality without a GPU.
    assert sorted(outcomes.values()) == ["passed"] * 4 + ["skipped"] * 7, outcomes
    determinism = next(t for t in steps["pytest"]["result"]["tests"] if "deterministic" in t["test"])
    assert determinism["nondeterministic_ops"] == "none"

    rows = report["throughput"]
    for batch in (4, 8):
        measured = {r["variant"]: r for r in rows if r["batch"] == batch}
        assert set(measured) >= {"reference", "engine fp32", "engine fp32 channels_last"}
        assert measured["reference"]["speedup_vs_reference"] == 1.0
        for r in measured.values():
            assert r["images_per_s"] > 0 and r["tflops"] > 0 and 0 < r["mfu_named"] < 1
            assert r["tflops"] == pytest.approx(r["mfu_measured"] * report["peak_tflops"]["measured"]["tflops"])
    (compiled,) = [r for r in rows if "compile" in r["variant"]]
    assert compiled["warmup_s"] > 0 and compiled["speedup_vs_reference"] > 0

    flops = steps["flops"]["result"]["iteration_flops"]
    assert set(flops) == {"resnet34-resnet18", "wrn_40_2-wrn_16_2"}
    assert all(0 < by_batch["4"] < by_batch["8"] for by_batch in flops.values())
    run = steps["run"]["result"]
    assert run["epochs"] == 2 and run["images_per_s"] > 0 and run["command"].startswith("cpsc-ray distill")

    summary = (out / "gpu_check.md").read_text()
    for title in [s["title"] for s in steps.values()] + ["FLOPs of one iteration", "CIFAR-100-shaped"]:
        assert title in summary
    assert "$ " in (out / "gpu_check.log").read_text()


def test_a_failing_or_hanging_step_is_recorded_and_the_rest_still_run(tmp_path):
    python = sys.executable
    steps = [
        gpu_check.Step("fails", "fails", lambda c: ([python, "-c", "raise SystemExit('broken')"], {}), lambda c: None),
        # A child that starts a grandchild and hangs: the whole group goes at the timeout.
        gpu_check.Step(
            "hangs",
            "hangs",
            lambda c: (
                [python, "-c", "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"],
                {},
            ),
            lambda c: None,
        ),
        gpu_check.Step("runs", "runs", lambda c: ([python, "-c", "print('fine')"], {}), lambda c: {"ran": True}),
    ]
    size = dataclasses.replace(gpu_check.QUICK, timeouts={"fails": 30, "hangs": 2, "runs": 30})
    check = gpu_check.Check(tmp_path, tmp_path, size, 989.0, "now", "abc1234", gpu_check.machine(), [])
    (tmp_path / "gpu_check.log").write_text("")
    started = time.perf_counter()
    gpu_check.run_steps(check, steps)
    assert time.perf_counter() - started < 20

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {s["key"]: s["status"] for s in report["steps"]}
    assert statuses == {"fails": "failed (exit 1)", "hangs": "timeout after 2 s", "runs": "ok"}
    assert "broken" in report["steps"][0]["error"] and report["steps"][2]["result"] == {"ran": True}
    assert "## Failures" in (tmp_path / "gpu_check.md").read_text()
    left = subprocess.run(["pgrep", "-f", "sleep 60"], capture_output=True, text=True).stdout.split()
    assert not left, f"the hanging step's processes outlived it: {left}"


def test_the_flop_count_extended_from_two_small_batches_is_exact():
    pair = ("wrn_40_2", "wrn_16_2")
    extended = step_flops.iteration_flops(*pair, [12], g_steps=1, s_steps=1)[12]
    assert extended == step_flops.counted_flops(*pair, 12, g_steps=1, s_steps=1)


def test_the_full_check_refuses_a_machine_without_a_gpu(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2 and "no CUDA device is visible" in done.stderr
