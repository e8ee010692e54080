"""The engine on CUDA: bf16 autocast and channels_last, a teacher that computes no gradients, exact
continuation from a state_dict in deterministic mode, and a probe set made on the GPU that loads on a
CPU-only machine.

Marked ``gpu`` and skipped without CUDA; ``benchmarks/gpu_check.py`` runs them with ``pytest -m gpu``.
Its dry run sets CPSC_RAY_GPU_TESTS_DEVICE=cpu, which runs them on the CPU at a tiny size, so that they
cannot rot where there is no GPU. Only this module's imports run on a GPU machine without Ray.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

from cpsc_ray.config import Config, load_config, with_values
from cpsc_ray.method.engine import DistillEngine
from cpsc_ray.method.metric_names import LOSS_METRICS
from cpsc_ray.method.models import build_model
from cpsc_ray.method.spec import ImageSpec

# cuBLAS is deterministic only with this workspace setting, read at its first GPU matrix product: before any test.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
DEVICE = os.environ.get("CPSC_RAY_GPU_TESTS_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
ON_CUDA = DEVICE == "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU (benchmarks/gpu_check.py runs these)"),
]

# CIFAR-100's shape with the cifar100_resnet34_resnet18 pair on a GPU; a small pair at a tiny batch on the CPU.
SPEC = ImageSpec(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
TEACHER, STUDENT, BATCH = ("resnet34", "resnet18", 128) if ON_CUDA else ("wrn_16_2", "wrn_16_1", 8)
NOT_DETERMINISTIC = "does not have a deterministic implementation"


def engine_for(amp: bool = False, channels_last: bool = True, **values) -> DistillEngine:
    cfg = with_values(
        Config(),
        {
            "teacher.arch": TEACHER,
            "student.arch": STUDENT,
            "train.device": DEVICE,
            "train.batch_size": BATCH,
            "train.iterations_per_epoch": 2,
            "train.g_steps": 2,
            "train.s_steps": 2,
            "train.epochs": 4,
            "train.amp": amp,
            "train.channels_last": channels_last,
            **values,
        },
    )
    torch.manual_seed(1)
    teacher = build_model(TEACHER, SPEC.num_classes)
    return DistillEngine(cfg, teacher, SPEC, device=torch.device(DEVICE))


def loss_values(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in LOSS_METRICS and v is not None}


def test_an_epoch_in_fp32_and_bf16_with_and_without_channels_last_gives_finite_losses_and_the_same_keys():
    keys = {}
    for amp in (False, True):
        for channels_last in (False, True):
            engine = engine_for(amp=amp, channels_last=channels_last)
            assert engine.amp == amp  # bf16 is on exactly where asked for, on CUDA and on the CPU
            if ON_CUDA:
                assert engine.student_opt.defaults["fused"] and engine.synthesizer.optimizer.defaults["fused"]
            with engine.autocast():
                logits = engine.student(torch.randn(2, 3, 32, 32, device=DEVICE))
            assert logits.dtype == (torch.bfloat16 if amp else torch.float32)
            metrics = engine.train_epoch()
            losses = loss_values(metrics)
            assert losses and all(math.isfinite(v) for v in losses.values()), (amp, channels_last, losses)
            keys[amp, channels_last] = sorted(metrics)
    assert len({tuple(k) for k in keys.values()}) == 1, keys


def test_generator_and_student_steps_compute_no_gradients_for_the_teacher():
    engine = engine_for()
    # Every parameter that accumulates a gradient counts it; the student only in student steps.
    accumulated = {"teacher": 0, "student": 0}

    def counter(model: str):
        def count(_: torch.Tensor) -> None:
            accumulated[model] += 1

        return count

    student_params = list(engine.student.parameters())
    for p in student_params:
        p.register_post_accumulate_grad_hook(counter("student"))
    assert all(not p.requires_grad for p in engine.teacher.parameters())  # a hook could not be registered
    engine.train_epoch()
    cfg = engine.cfg.train
    assert all(p.grad is None for p in engine.teacher.parameters())
    assert accumulated["student"] == len(student_params) * cfg.iterations_per_epoch * cfg.s_steps


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts' float tensors (inf where shapes differ)."""
    worst = 0.0
    for key, x in a.items():
        y = b[key]
        if isinstance(x, dict):
            worst = max(worst, max_difference(x, y))
        elif isinstance(x, torch.Tensor) and x.is_floating_point():
            worst = max(worst, (x.double() - y.double()).abs().max().item() if x.shape == y.shape else math.inf)
    return worst


def test_a_state_dict_continues_identically_in_deterministic_mode(record_property):
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            unbroken = engine_for()
            unbroken.train_epoch()
            saved = io.BytesIO()
            torch.save(unbroken.state_dict(), saved)
            unbroken.train_epoch()

            again = engine_for()  # the same two epochs again: what this device's kernels repeat exactly
            again.train_epoch()
            again.train_epoch()

            resumed = engine_for()
            saved.seek(0)
            resumed.load_state_dict(torch.load(saved, map_location=DEVICE, weights_only=True))
            resumed.train_epoch()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = cudnn_benchmark
    refused = sorted({str(w.message).split(" does not")[0] for w in caught if NOT_DETERMINISTIC in str(w.message)})
    record_property("nondeterministic_ops", ", ".join(refused) or "none")
    noise = max_difference(again.state_dict(), unbroken.state_dict())
    difference = max_difference(resumed.state_dict(), unbroken.state_dict())
    if not refused:
        assert noise == 0.0, f"two identical runs differ by {noise:g} with every operation deterministic"
    # Where some kernel is not deterministic, a resumed run may differ as much as a repeated run does.
    assert difference <= 10 * noise, (
        f"the resumed run differs from the unbroken one by {difference:g}, a repeat by {noise:g}; "
        f"operations without a deterministic kernel: {refused or 'none'}"
    )


def test_a_probe_set_made_on_the_gpu_loads_on_a_machine_without_one(tmp_path):
    from cpsc_ray.runs.probe import load_or_make_probe
    from cpsc_ray.runs.teacher import load_teacher

    weights = tmp_path / "teacher.safetensors"
    save_file(build_model("digits_teacher", 10, 1).state_dict(), str(weights))
    overrides = [f"teacher.weights={weights}", "eval.probe_per_class=2", "eval.probe_steps=3"]
    cfg = load_config("digits", overrides)
    images, labels = load_or_make_probe(load_teacher(cfg), cfg.eval, torch.device(DEVICE))
    assert images.device.type == "cpu" and labels.device.type == "cpu"
    torch.save({"images": images, "labels": labels}, tmp_path / "made.pt")

    # A new process that sees no GPU finds the stored set and reads it.
    script = (
        "import sys, torch\n"
        "from cpsc_ray.config import load_config\n"
        "from cpsc_ray.runs.probe import load_or_make_probe\n"
        "from cpsc_ray.runs.teacher import load_teacher\n"
        "import cpsc_ray.runs.probe as probe\n"
        "probe.synthesize_probe = None  # must not be needed: the set is stored\n"
        "cfg = load_config('digits', sys.argv[1:])\n"
        "images, labels = load_or_make_probe(load_teacher(cfg), cfg.eval, torch.device('cpu'))\n"
        f"made = torch.load({str(tmp_path / 'made.pt')!r}, weights_only=True)\n"
        "assert not torch.cuda.is_available()\n"
        "assert torch.equal(images, made['images']) and torch.equal(labels, made['labels'])\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", script, *overrides], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(not ON_CUDA, reason="tests/test_distributed.py runs Ray Train on the CPU")
def test_a_ray_train_run_on_a_gpu_worker_records_the_gpu(tmp_path):
    ray = pytest.importorskip("ray", reason="needs Ray, which this machine does not have")
    from conftest import TINY

    from cpsc_ray.cli import main
    from cpsc_ray.results.tables import read_results

    argv = ["distill", "--name", "gpu", "--workers", "1", "--gpus-per-worker", "1", "--storage", str(tmp_path)]
    try:
        assert main([*argv, *TINY]) == 0
    finally:
        ray.shutdown()
    trials = read_results([str(tmp_path)]).trials
    assert list(trials["device"]) == [torch.cuda.get_device_name()]
