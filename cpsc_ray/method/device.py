"""Where and how an engine runs: the device a run uses, chosen here only, its models compiled or not, and the CUDA
RNG state a checkpoint holds for it."""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable

import torch
from torch import Tensor, nn

from cpsc_ray.config import TrainConfig
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
        saved = saved[index] if index < len(saved) else None
    return None if saved is None else saved.cpu()  # a host tensor, even from a dict loaded onto the GPU


def compiled(module: nn.Module, train: TrainConfig) -> Callable[..., Any]:
    """``module`` compiled as ``train.compile`` and ``train.compile_mode`` ask (the module itself when not)."""
    return torch.compile(module, mode=train.compile_mode) if train.compile else module


def graph_step_begins(train: TrainConfig) -> None:
    """Tell CUDA-graph replay (``compile_mode=reduce-overhead``) that a new step begins: the previous step's graph
    outputs are consumed, so the next replay may overwrite them."""
    if train.compile and train.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


# glibc's mallopt parameters, and its largest mmap threshold on 64-bit hosts.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX = -1, -3, 32 * 2**20


@functools.cache  # process-wide settings: once per process
def keep_freed_host_memory() -> None:
    """Let this process reuse the memory of freed tensors instead of handing it back to the OS (glibc only).

    By default glibc maps each allocation over its mmap threshold afresh and returns freed heap tops over its trim
    threshold, so every CPU training step faults in and zeroes the pages of its activations again: with this the
    engine's fp32 CPU step ran 18-25% faster (BENCHMARKS.md, issue 22). Other C libraries are left as they are."""
    libc = ctypes.CDLL(None)  # the symbols this process already has: its C library's among them
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
