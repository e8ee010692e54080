"""Opt-in diagnostics of the method (``eval.term_gradients``): which generator-loss term drives the
generator, measured without changing what training draws or learns."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cpsc_ray.config import Config
from cpsc_ray.method.losses import SynthBatch, WeightedSum
from cpsc_ray.method.parallel import noise_seed
from cpsc_ray.method.spec import ImageSpec


class Measured(Protocol):
    """What the measurement reads of an engine: its generator objective, how it builds a synthetic batch for it,
    and where it runs. ``DistillEngine`` is one; the engine's module is not imported, which imports this one."""

    cfg: Config
    spec: ImageSpec
    device: torch.device
    rank: int
    world_size: int
    epoch: int
    local_batch: int
    student: nn.Module
    generator: nn.Module
    head: nn.Module | None
    generator_loss: WeightedSum

    def autocast(self) -> AbstractContextManager: ...

    def generator_batch(self, z: Tensor, y: Tensor, generator: nn.Module, head: nn.Module | None) -> SynthBatch: ...


def term_gradients(engine: Measured) -> dict[str, float]:
    """Each generator term's weighted gradient norm at the generator's weights, on one extra batch:
    which term drives the generator. The batch comes from its own stream, so training draws the same."""
    objective = engine.generator_loss
    rng = torch.Generator(device=engine.device).manual_seed(noise_seed(engine.cfg.seed + 1, engine.rank, engine.epoch))
    z = torch.randn(engine.local_batch, engine.cfg.generator.nz, device=engine.device, generator=rng)
    y = torch.randint(0, engine.spec.num_classes, (engine.local_batch,), device=engine.device, generator=rng)
    params = [p for p in engine.generator.parameters() if p.requires_grad]
    # This forward must not move the BN running statistics: training continues as if it never ran.
    buffers = [b for model in (engine.student, engine.generator) for b in model.buffers()]
    saved = [b.clone() for b in buffers]
    with engine.autocast():
        batch = engine.generator_batch(z, y, engine.generator, engine.head)
        values = {name: term(batch) for name, term in objective.terms.items()}
    norms = {}
    for name, value in values.items():
        grads = torch.autograd.grad(objective.weights[name] * value, params, retain_graph=True, allow_unused=True)
        norms[f"g_grad_{name}"] = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads if g is not None])
        )
    with torch.no_grad():
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)
    names = sorted(norms)
    values_tensor = torch.stack([norms[n] for n in names])
    if engine.world_size > 1:
        dist.all_reduce(values_tensor)
        values_tensor /= engine.world_size
    return dict(zip(names, values_tensor.tolist()))
