"""PBT lineage: what a trial that cloned a better trial's state records once that state is restored,
so that a clone can be checked (the state digest) and the chosen configuration replayed later."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cpsc_ray.method.engine import DistillEngine
from cpsc_ray.storage import Storage


@dataclass(frozen=True)
class Exploit:
    """A PBT clone: the trial copied, at which epoch, from which checkpoint, and the configs around it."""

    source_trial_id: str
    epoch: int
    source_checkpoint: str
    config_before: dict[str, Any] | None
    config_after: dict[str, Any]


def state_digest(state: dict) -> str:
    """A hash of the learned state (weights and optimizer moments; not hyperparameters), so two
    states can be compared without holding both."""
    digest = hashlib.sha256()

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(prefix.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                add(f"{prefix}.{key}", value[key])

    for part in ("student", "generator", "head"):
        add(part, state[part])
    for part in ("student_opt", "generator_opt"):
        add(part, state[part]["state"])
    return digest.hexdigest()


def read_lineage(outputs: Storage) -> list[dict[str, Any]]:
    return outputs.read_json("lineage.json") if outputs.exists("lineage.json") else []


def last_clone_is(lineage: list[dict[str, Any]], source_checkpoint: str) -> bool:
    """Whether the trial's latest recorded clone came from this checkpoint: restoring it again (a
    paused trial, a round restarted before its first checkpoint) is no new exploit."""
    return bool(lineage) and lineage[-1]["source_checkpoint"] == source_checkpoint


def record_exploit(outputs: Storage, engine: DistillEngine, exploit: Exploit) -> None:
    """PBT lineage: which trial this one cloned, at which epoch, the configs before and after, and
    what is in effect right after the restore (state digest, learning rates, loss weights)."""
    lineage = read_lineage(outputs)
    if last_clone_is(lineage, exploit.source_checkpoint):
        return
    lineage.append(
        {
            **asdict(exploit),
            "state_digest": state_digest(engine.state_dict()),
            "lr_student": engine.student_opt.param_groups[0]["lr"],
            "lr_generator": engine.generator_opt.param_groups[0]["lr"],
            "loss_weights": {
                "generator": engine.generator_loss.weights,
                "student": engine.student_loss.weights,
                "temperature": engine.cfg.loss.temperature,
            },
        }
    )
    outputs.write_json("lineage.json", lineage)
