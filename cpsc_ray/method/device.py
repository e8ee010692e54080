"""Where an engine runs: the device a run uses, chosen here only, and the CUDA RNG state a checkpoint holds for it."""

from __future__ import annotations

import torch
from torch import Tensor

from cpsc_ray.errors import InputError


def pick_device(requested: str, assigned: torch.device | None = None) -> torch.device:
    """The device a run uses, chosen here only: ``train.device`` (auto, cpu or cuda), and under Ray the device Ray
    ``assigned`` the process. Ray hides no GPU from a process that asked for none, so there ``auto`` means the
    assigned device, not any GPU in sight."""
    if requested == "cpu":
        return torch.device("cpu")
    if assigned is not None:
        if requested == "cuda" and assigned.type != "cuda":
            raise InputError(
                "train.device=cuda but Ray gave this process no GPU: ask for GPUs (--gpus-per-worker, "
                "--gpus-per-trial) or use train.device=auto"
            )
        return assigned
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if requested == "cuda":
        raise InputError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return torch.device("cpu")


def device_rng_state(saved: Tensor | list[Tensor] | None, device: torch.device) -> Tensor | None:
    """The CUDA RNG state a checkpoint holds for ``device``, or None. Checkpoints hold the state of
    their engine's device; older ones hold one per GPU visible then (other workers' GPUs included),
    of which only this device's index is ours, if the restart sees that many. Noise streams are
    reseeded every epoch, so a state that does not carry over costs nothing the run needs."""
    if device.type != "cuda" or saved is None:
        return None
    if isinstance(saved, list):
        index = device.index or 0
        return saved[index] if index < len(saved) else None
    return saved
