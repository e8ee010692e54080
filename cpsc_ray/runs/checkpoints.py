"""Checkpoints of a run: the engine's complete state (``state.pt``) and the run's bookkeeping
(``meta.json``), written as bytes so that any storage (a local folder, object storage, a Ray
checkpoint directory) can hold them, and read back with ``weights_only=True``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from cpsc_ray.errors import InputError
from cpsc_ray.layout import CheckpointDir, RunDir
from cpsc_ray.method.engine import DistillEngine
from cpsc_ray.storage import Storage

BEST_STUDENT = "best_student"  # the state entry that holds the run's best student weights


def checkpoint_files(
    engine: DistillEngine, meta: dict[str, Any], best_student: dict[str, Any] | None = None
) -> dict[str, bytes]:
    """``best_student``: the run's best weights so far, so that a restart keeps them rather than one
    from the epochs it lost (the engine ignores the entry)."""
    buffer = io.BytesIO()
    state = engine.state_dict()
    if best_student is not None:
        state[BEST_STUDENT] = best_student
    torch.save(state, buffer)
    return {
        CheckpointDir.STATE: buffer.getvalue(),
        CheckpointDir.META: json.dumps(meta, indent=2, default=str).encode(),
    }


def write_checkpoint_dir(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)


class CheckpointError(InputError):
    """A checkpoint that cannot be restored; the message names the file and what is wrong."""


def read_checkpoint(storage: Storage, relative: str = "") -> tuple[dict, dict]:
    """(engine state, meta) of a checkpoint directory, loaded with ``weights_only=True``."""
    directory = storage.child(relative) if relative else storage
    where = directory.uri()
    for name in (CheckpointDir.STATE, CheckpointDir.META):
        if not directory.exists(name):
            raise CheckpointError(f"checkpoint {where}: {name} is missing; is this a cpsc-ray checkpoint directory?")
    try:
        meta = directory.read_json(CheckpointDir.META)
        state = torch.load(io.BytesIO(directory.read_bytes(CheckpointDir.STATE)), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch and json raise many types for a damaged file
        raise CheckpointError(f"checkpoint {where}: cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "student" not in state or "epoch" not in meta:
        raise CheckpointError(f"checkpoint {where}: not an engine state (no student weights or epoch)")
    return state, meta


def restore_engine(engine: DistillEngine, state: dict, where: str) -> None:
    try:
        engine.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"checkpoint {where}: does not fit this run's models ({first})") from None


def newest_checkpoint(run: RunDir) -> str | None:
    """The newest checkpoint directory of a run (relative to it), whichever mode wrote it: an in-process
    run's ``checkpoints/last`` or Ray Train's ``checkpoint_*``; None when there is none."""
    metas = {d: f"{d}/{CheckpointDir.META}" for d in run.checkpoints()}
    epochs = {d: run.read_json(meta)["epoch"] for d, meta in metas.items() if run.exists(meta)}
    return max(epochs, key=epochs.get) if epochs else None


def resume_point(run: RunDir, name: str) -> str | None:
    """What ``--resume`` continues from: the newest checkpoint. A run that has epochs but no checkpoint
    is refused rather than started over, which would overwrite its metrics."""
    newest = newest_checkpoint(run)
    if newest is None and run.metric_rows():
        raise CheckpointError(
            f"--resume {name}: the run has metrics but no checkpoint to continue from ({run.uri()}); "
            f"start a new run instead (without --resume)"
        )
    return newest
