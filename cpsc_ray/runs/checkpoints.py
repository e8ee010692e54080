"""Checkpoints of a run: the engine's complete state (``state.pt``) and the run's bookkeeping
(``meta.json``), written as bytes so that any storage (a local folder, object storage, a Ray
checkpoint directory) can hold them, and read back with ``weights_only=True``.

``meta.json`` is also the checkpoint's manifest: written last, it names every other file with its size and
SHA-256. A checkpoint is complete when its meta is there and every file it names has its size; a process or a
node lost while writing (or uploading) one leaves it incomplete, and resuming skips it, with a warning, for
the one before. ``checkpoints/last`` keeps that one as ``checkpoints/previous`` until the new one is whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from cpsc_ray.errors import InputError
from cpsc_ray.layout import CheckpointDir, RunDir
from cpsc_ray.method.engine import DistillEngine
from cpsc_ray.storage import Storage

logger = logging.getLogger(__name__)

BEST_STUDENT = "best_student"  # the state entry that holds the run's best student weights
MANIFEST = "files"  # the meta entry naming every other file: {name: {"bytes": n, "sha256": hex}}


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
    return with_manifest({CheckpointDir.STATE: buffer.getvalue()}, meta)


def with_manifest(files: dict[str, bytes], meta: dict[str, Any]) -> dict[str, bytes]:
    """``files`` and, last, the meta that names them: write them in this order."""
    manifest = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    return {**files, CheckpointDir.META: json.dumps({**meta, MANIFEST: manifest}, indent=2, default=str).encode()}


def write_checkpoint_dir(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)


def write_last_checkpoint(run: RunDir, files: dict[str, bytes]) -> None:
    """The run's last checkpoint rewritten, the complete one it held kept as the previous until the new one is
    whole."""
    if missing_files(run, RunDir.LAST_CHECKPOINT) is None:
        run.move_dir(RunDir.LAST_CHECKPOINT, RunDir.PREVIOUS_CHECKPOINT)
    for name, data in files.items():
        run.write_bytes(f"{RunDir.LAST_CHECKPOINT}/{name}", data)


class CheckpointError(InputError):
    """A checkpoint that cannot be restored; the message names the file and what is wrong."""


def read_checkpoint(storage: Storage, relative: str = "") -> tuple[dict, dict]:
    """(engine state, meta) of a checkpoint directory, loaded with ``weights_only=True``; its state checked
    against the digest its meta names (checkpoints written before the manifest name none)."""
    directory = storage.child(relative) if relative else storage
    where = directory.uri()
    for name in (CheckpointDir.STATE, CheckpointDir.META):
        if not directory.exists(name):
            raise CheckpointError(f"checkpoint {where}: {name} is missing; is this a cpsc-ray checkpoint directory?")
    try:
        meta = directory.read_json(CheckpointDir.META)
        data = directory.read_bytes(CheckpointDir.STATE)
    except Exception as err:  # noqa: BLE001 - pyarrow and json raise many types for a damaged file
        raise CheckpointError(f"checkpoint {where}: cannot be read ({type(err).__name__}: {err})") from None
    listed = meta.get(MANIFEST, {}).get(CheckpointDir.STATE)
    if listed is not None and hashlib.sha256(data).hexdigest() != listed["sha256"]:
        raise CheckpointError(
            f"checkpoint {where}: {CheckpointDir.STATE} does not match its digest (written only in part?)"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
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


def missing_files(run: RunDir, checkpoint: str) -> str | None:
    """What a checkpoint directory lacks to be complete (its meta, or a file of the size its meta names), or
    None when it is complete. A checkpoint written before the manifest is taken as complete when its meta is
    there (its state was written first)."""
    meta = f"{checkpoint}/{CheckpointDir.META}"
    if not run.exists(meta):
        return CheckpointDir.META
    for name, listed in run.read_json(meta).get(MANIFEST, {}).items():
        info = run.fs.get_file_info(run.path(checkpoint, name))
        if info.size != listed["bytes"]:
            return f"{name} ({info.size or 0} of {listed['bytes']} bytes)"
    return None


def newest_checkpoint(run: RunDir, registered: set[str] | None = None) -> str | None:
    """The newest complete checkpoint directory of a run (relative to it), whichever mode wrote it: an
    in-process run's last or previous, or Ray Train's (only those in ``registered`` when given: the ones Ray
    Train took in); None when there is none. Incomplete ones, and Ray Train's that it never registered, are
    skipped with a warning."""
    trained = run.ray_checkpoints()
    epochs = {}
    for directory in run.checkpoints():
        if not run.exists(directory):
            continue
        missing = missing_files(run, directory)
        if missing is None and registered is not None and directory in trained and directory not in registered:
            missing = "Ray Train's registration (written as its node or process was lost)"
        if missing is None:
            epochs[directory] = run.read_json(f"{directory}/{CheckpointDir.META}")["epoch"]
        else:
            logger.warning("checkpoint %s is incomplete, skipped: it lacks %s", run.uri(directory), missing)
    return max(epochs, key=epochs.get) if epochs else None


def resume_point(run: RunDir, name: str, registered: set[str] | None = None, or_start: bool = False) -> str | None:
    """What ``--resume`` continues from: the newest complete checkpoint. A run that has epochs but no
    checkpoint is refused rather than started over, which would overwrite its metrics; with ``or_start``
    (``--resume-or-start``: a retried job must not fail for it) it starts over, its lost epochs charged to it."""
    newest = newest_checkpoint(run, registered)
    if newest is None and run.metric_rows():
        if or_start:
            logger.warning("run %s has epochs but no complete checkpoint: it starts over (%s)", name, run.uri())
            return None
        raise CheckpointError(
            f"--resume {name}: the run has metrics but no checkpoint to continue from ({run.uri()}); "
            f"start a new run instead (without --resume)"
        )
    return newest
