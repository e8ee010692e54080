"""The inputs of ``scaling_model.py``. Counted on a CPU from an engine's own models and config: what one
data-parallel distillation sends, what every rank computes whatever the split, and how the work
divides between generator and student steps. Measured: one GPU's time and memory per iteration, read
from step_throughput.py's JSON and fitted.

Read from ``cpsc_ray/method/engine.py``, ``losses.py`` and ``parallel.py`` (README, "One distillation on
many GPUs"); ``tests/test_scaling_model.py`` checks every count against what two gloo workers send.

- Generator step: the SupCon views (``[b, 2, D]`` fp32, D the teacher's feature width) and the
  pseudo-labels (int64) all-gathered with autograd; in the backward the views' gradient comes back
  as a reduce-scatter (NCCL; gloo emulates it with one scatter per rank); the teacher's per-layer BN
  means and mean squares (fp32) all-reduced in the forward and again, for their gradient, in the
  backward; DDP's all-reduce of the generator's gradients (and of a trained projection head's).
- Student step: DDP broadcasts the student's buffers (BN running statistics) from rank 0 before each
  forward (``broadcast_buffers``, one coalesced call), then all-reduces its gradients in buckets.
- Epoch end: the epoch's metric means all-reduced, and each student buffer broadcast (generator
  steps update them with each rank's own batches).
Not counted: DDP's one-time broadcasts at construction and its first-iteration bucket rebuild,
evaluation's count all-reduce, and the opt-in ``eval.term_gradients`` diagnostics.

Replicated: every rank computes SupCon over the gathered global batch, ``N = 2 x global batch``
embeddings: an ``N x N`` similarity matrix and its log-probabilities, forward and backward.

The split: FLOPs of a generator step, a student step and the student's backward in it, per image,
counted as they run (step_flops.counted_flops) by ``count_step_flops``.
"""

from __future__ import annotations

import functools
import json
import statistics
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from cpsc_ray.method.engine import DistillEngine
from cpsc_ray.method.losses import supervised_contrastive
from cpsc_ray.method.metric_names import SYNTHESIS_METRICS
from cpsc_ray.method.models import build_model

# DistributedDataParallel's defaults: the first bucket is capped at 1 MiB so that the all-reduce starts
# early, the others at bucket_cap_mb = 25 MiB; a bucket closes once it reaches its cap.
FIRST_BUCKET_BYTES, BUCKET_BYTES = 1 << 20, 25 << 20
FP32, INT64 = 4, 8


@dataclass(frozen=True)
class Message:
    """One collective call. ``nbytes``: the tensor for all_reduce and broadcast; the whole gathered
    tensor (world x per-rank part) for all_gather and reduce_scatter."""

    what: str
    collective: str  # all_reduce | all_gather | reduce_scatter | broadcast
    nbytes: int
    step: str  # generator | student | epoch: once per such step, or once per epoch


def ddp_buckets(module: nn.Module) -> list[int]:
    """Byte sizes of DDP's gradient buckets once it has rebuilt them in the order gradients become
    ready (about the reverse of the parameters' order)."""
    sizes, bucket = [], 0
    for param in reversed([p for p in module.parameters() if p.requires_grad]):
        bucket += param.numel() * param.element_size()
        if bucket >= (FIRST_BUCKET_BYTES if not sizes else BUCKET_BYTES):
            sizes.append(bucket)
            bucket = 0
    return sizes + [bucket] if bucket else sizes


@functools.cache
def feature_width(engine: DistillEngine) -> int:
    """The teacher's feature width, D of the SupCon views."""
    spec = engine.spec
    probe = torch.zeros(2, spec.channels, spec.image_size, spec.image_size, device=engine.device)
    with torch.no_grad():
        return engine.teacher(probe, return_features=True)[1].shape[1]


def traffic(engine: DistillEngine, world_size: int, local_batch: int) -> list[Message]:
    """Every collective that ``engine``'s config sends on ``world_size`` ranks of ``local_batch`` images
    each. ``engine`` may be a single-process one: only its models and config are read."""
    if world_size == 1:
        return []
    synthesizer = engine.synthesizer
    objective, messages = synthesizer.objective, []
    if "scl" in objective.terms:
        views = world_size * local_batch * 2 * feature_width(engine) * FP32
        labels = world_size * local_batch * INT64
        messages += [
            Message("SupCon features and labels", collective, nbytes, "generator")
            for collective, nbytes in (("all_gather", views), ("all_gather", labels), ("reduce_scatter", views))
        ]
        if synthesizer.head is not None and engine.cfg.loss.train_projection_head:
            messages += [Message("head gradients", "all_reduce", b, "generator") for b in ddp_buckets(synthesizer.head)]
    if "bn" in objective.terms:
        moments = 2 * sum(layer.num_features for layer in synthesizer.bn_prior.layers) * FP32
        messages += [Message("BN statistics", "all_reduce", moments, "generator")] * 2  # forward, backward
    messages += [
        Message("generator gradients", "all_reduce", b, "generator") for b in ddp_buckets(synthesizer.generator)
    ]
    buffers = list(engine.student.buffers())
    buffer_bytes = sum(b.numel() * b.element_size() for b in buffers)
    if buffers:
        messages.append(Message("student buffers", "broadcast", buffer_bytes, "student"))
    messages += [Message("student gradients", "all_reduce", b, "student") for b in ddp_buckets(engine.student)]
    # The epoch's means: each term with its total, of both objectives, the synthesis health, a finite flag.
    metrics = len(objective.terms) + len(engine.student_loss.terms) + 2 + len(SYNTHESIS_METRICS) + 1
    messages.append(Message("epoch end", "all_reduce", metrics * FP32, "epoch"))
    messages += [Message("epoch end", "broadcast", b.numel() * b.element_size(), "epoch") for b in buffers]
    return messages


@dataclass(frozen=True)
class ContrastiveCost:
    """SupCon's work on ``N`` embeddings of width ``dim``, per generator step, forward and backward: matrix
    FLOPs ``flops_per_n2d * N^2 * dim``, memory traffic and peak memory of its ``N x N`` tensors
    (``* N^2`` bytes). Counted in fp32; under bf16 autocast some of those tensors are half as large."""

    dim: int
    flops_per_n2d: float
    traffic_per_n2: float
    peak_per_n2: float

    def seconds(self, n: float, matmul_tflops: float, memory_tb_s: float) -> float:
        """Roofline: the slower of its matrix products and its passes over the N x N tensors."""
        return max(
            self.flops_per_n2d * n * n * self.dim / (matmul_tflops * 1e12),
            self.traffic_per_n2 * n * n / (memory_tb_s * 1e12),
        )

    def peak_bytes(self, n: float) -> float:
        return self.peak_per_n2 * n * n


class _SquareTensors(TorchDispatchMode):
    """Bytes that operators read and write in ``side x side`` tensors (views and broadcasts move
    nothing), and the peak of such tensors alive at once."""

    def __init__(self, side: int):
        super().__init__()
        self.side, self.traffic, self.alive, self.peak = side, 0, {}, 0

    def _big(self, t) -> bool:
        return isinstance(t, Tensor) and t.shape == (self.side, self.side)

    @staticmethod
    def _bytes(t: Tensor) -> int:
        return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            touched = [t for t in tree_leaves((args, kwargs, out)) if self._big(t)]
            self.traffic += sum(self._bytes(t) for t in touched)
        for t in tree_leaves(out):
            if self._big(t) and t.untyped_storage().data_ptr() not in self.alive:
                storage = t.untyped_storage()
                self.alive[storage.data_ptr()] = storage.nbytes()
                weakref.finalize(storage, self.alive.pop, storage.data_ptr())
                self.peak = max(self.peak, sum(self.alive.values()))
        return out


def count_contrastive(dim: int, classes: int) -> ContrastiveCost:
    """Count SupCon's cost once, at a few more embeddings than ``dim`` (so that no ``N x dim`` tensor
    looks square); its ``N x N`` parts scale exactly as ``N^2``."""
    views = 2 * (dim // 2 + 1)
    rng = torch.Generator().manual_seed(0)
    features = torch.randn(views // 2, 2, dim, generator=rng, requires_grad=True)
    labels = torch.randint(0, classes, (views // 2,), generator=rng)
    normalized = nn.functional.normalize(features, dim=2)
    with FlopCounterMode(display=False) as flops, _SquareTensors(views) as square:
        supervised_contrastive(normalized, labels, 0.07, 0.07).backward()
    n2 = views * views
    return ContrastiveCost(dim, flops.get_total_flops() / (n2 * dim), square.traffic / n2, square.peak / n2)


def count_step_flops(batch: int = 2) -> dict[str, dict[str, float]]:
    """Per pair of step_throughput.PAIRS (100 classes, 32 px): FLOPs per image of a generator step
    (SupCon's N^2 part removed), a student step and the student's backward, from one iteration
    counted at 1+1, 2+1 and 1+2 steps."""
    from step_flops import counted_flops
    from step_throughput import CLASSES, PAIRS, SPEC

    result = {}
    for name, (teacher, student) in PAIRS.items():
        count = {steps: counted_flops(teacher, student, batch, *steps) for steps in ((1, 1), (2, 1), (1, 2))}
        model = build_model(student, CLASSES)
        logits = model(torch.randn(batch, SPEC.channels, SPEC.image_size, SPEC.image_size))
        with FlopCounterMode(display=False) as backward:
            logits.sum().backward()
        width = build_model(teacher, CLASSES).feature_dim
        contrastive = count_contrastive(width, CLASSES).flops_per_n2d * (2 * batch) ** 2 * width
        result[name] = {
            "generator_step": (count[2, 1] - count[1, 1] - contrastive) / batch,
            "student_step": (count[1, 2] - count[1, 1]) / batch,
            "student_backward": backward.get_total_flops() / batch,
            "count_batch": batch,
        }
    return result


def measured_points(files: list[Path], pair: str, variants: tuple[str, ...]) -> dict[int, tuple[float, float]]:
    """Batch -> (seconds per iteration, peak GiB) from step_throughput.py's JSON: the mean over ``variants``."""
    points: dict[int, list[tuple[float, float]]] = {}
    for path in files:
        run = json.loads(path.read_text())
        steps = run["args"]["g_steps"] + run["args"]["s_steps"]
        for row in run["results"]:
            if row["pair"] == pair and row["variant"] in variants and row.get("images_per_s"):
                batch = run["args"]["batch"]
                points.setdefault(batch, []).append((steps * batch / row["images_per_s"], row["peak_gib"]))
    if not points:
        raise SystemExit(f"no measurement of {pair} {list(variants)} in {[str(f) for f in files]}")
    return {b: (statistics.mean(s for s, _ in v), statistics.mean(m for _, m in v)) for b, v in points.items()}


def fit(points: dict[int, float]) -> tuple[float, float]:
    """Intercept and slope by least squares; through the origin from a single point."""
    if len(points) == 1:
        ((x, y),) = points.items()
        return 0.0, y / x
    slope, intercept = statistics.linear_regression(list(points), list(points.values()))
    return intercept, slope
