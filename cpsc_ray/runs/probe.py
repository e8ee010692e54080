"""The data-free proxy's probe set: images synthesized once per teacher, from the teacher alone.

Inputs are optimised DeepInversion-style (``method.synthesis.OptimisedBatch``: cross-entropy to balanced class
targets, the teacher's BN-statistics prior, a small total-variation prior). The set is stored beside the teacher's
weights and shared by every run and trial with that teacher, so student-teacher agreement on it is comparable across
runs, and no run's own generator can game it.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from cpsc_ray.config import EvalConfig
from cpsc_ray.method.losses import BNStatisticsPrior
from cpsc_ray.method.synthesis import OptimisedBatch
from cpsc_ray.storage import Storage

if TYPE_CHECKING:
    from cpsc_ray.runs.teacher import Teacher

PROBE_BATCH = 256
PROBE_SEED = 0


def probe_name(weights: Path, cfg: EvalConfig) -> str:
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    return f"{weights.stem}.probe-{cfg.probe_per_class}x{cfg.probe_steps}-{cfg.probe_lr:g}-{digest}.pt"


def synthesize_probe(
    teacher: nn.Module, num_classes: int, channels: int, image_size: int, cfg: EvalConfig, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Returns (images, the teacher's predicted labels). Classes are interleaved so every optimisation
    batch holds all of them, as the BN statistics of a real batch would."""
    teacher = teacher.to(device).eval().requires_grad_(False)
    targets = torch.arange(num_classes, device=device).repeat(cfg.probe_per_class)
    rng = torch.Generator(device=device).manual_seed(PROBE_SEED)
    images = torch.randn(len(targets), channels, image_size, image_size, device=device, generator=rng)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    prior = BNStatisticsPrior(teacher) if has_bn else None
    try:
        for start in range(0, len(targets), PROBE_BATCH):
            chunk = slice(start, start + PROBE_BATCH)
            batch = OptimisedBatch(teacher, images[chunk], targets[chunk], cfg.probe_lr, prior)
            for _ in range(cfg.probe_steps):
                batch.synthesize()
            images[chunk] = batch.sample()[0]
    finally:
        if prior is not None:
            prior.close()
    with torch.no_grad():
        predicted = torch.cat(
            [teacher(images[i : i + PROBE_BATCH]).argmax(1) for i in range(0, len(images), PROBE_BATCH)]
        )
    return images.cpu(), predicted.cpu()


def load_or_make_probe(teacher: Teacher, cfg: EvalConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """The teacher's probe set, made on first use and stored beside its weights (a path or a URI)."""
    beside, _ = Storage.of_file(teacher.location)
    name = probe_name(teacher.weights, cfg)
    if beside.exists(name):
        stored = torch.load(io.BytesIO(beside.read_bytes(name)), map_location="cpu", weights_only=True)
        return stored["images"], stored["labels"]
    info = teacher.info
    images, labels = synthesize_probe(teacher.model, info.num_classes, info.channels, info.image_size, cfg, device)
    buffer = io.BytesIO()
    torch.save({"images": images, "labels": labels}, buffer)
    beside.write_bytes(name, buffer.getvalue())
    return images, labels
