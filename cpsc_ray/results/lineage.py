"""A PBT trial's lineage: the clones its state went through, one typed record each, as the trial writes them
(``lineage.json`` in its run directory, ``runs.exploit``) and as the results' lineage table holds them
(``results.replay`` replays them into the configs a finalize rerun follows)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from cpsc_ray.layout import RunDir

JSON_COLUMNS = ("loss_weights", "config_before", "config_after")  # mappings, stored in the table as JSON text


@dataclass(frozen=True)
class Exploit:
    """A PBT clone: the trial copied, at which epoch, from which checkpoint, and the configs around it."""

    source_trial_id: str
    epoch: int
    source_checkpoint: str
    config_before: dict[str, Any] | None
    config_after: dict[str, Any]


@dataclass(frozen=True)
class Clone(Exploit):
    """A clone as recorded once its state was restored, with what was in effect right after: the state's digest
    (to check the copy), the learning rates and the loss weights."""

    state_digest: str
    lr_student: float
    lr_generator: float
    loss_weights: dict[str, Any]

    def row(self, experiment: str, dataset: str, trial_id: str) -> dict[str, Any]:
        """The clone as a row of the results' lineage table (``schema.LINEAGE_SCHEMA``)."""
        row = {"experiment": experiment, "dataset": dataset, "trial_id": trial_id, **asdict(self)}
        return {k: json.dumps(v) if k in JSON_COLUMNS else v for k, v in row.items()}


def read_lineage(trial: RunDir) -> list[Clone]:
    if not trial.exists(RunDir.LINEAGE):
        return []
    known = {f.name for f in fields(Clone)}
    return [Clone(**{k: v for k, v in entry.items() if k in known}) for entry in trial.read_json(RunDir.LINEAGE)]


def last_clone_is(lineage: list[Clone], source_checkpoint: str) -> bool:
    """Whether the trial's latest recorded clone came from this checkpoint: restoring it again (a paused trial, a
    round restarted before its first checkpoint) is no new exploit."""
    return bool(lineage) and lineage[-1].source_checkpoint == source_checkpoint


def forget_clones_after(trial: RunDir, epoch: int, where: str) -> None:
    """The trial goes on from the state at ``where``, of ``epoch``: clones recorded after that state (or at its
    epoch, from another checkpoint) belong to a branch the experiment no longer knows, as when the driver died
    before its snapshot named the clone. The lineage keeps the path the trial's state actually took."""
    lineage = read_lineage(trial)
    kept = [c for c in lineage if c.epoch < epoch or (c.epoch == epoch and c.source_checkpoint == where)]
    if len(kept) < len(lineage):
        trial.write_json(RunDir.LINEAGE, [asdict(c) for c in kept])


def append_clone(trial: RunDir, clone: Clone) -> None:
    """Add a clone to the trial's lineage, unless it is the one last recorded."""
    lineage = read_lineage(trial)
    if not last_clone_is(lineage, clone.source_checkpoint):
        trial.write_json(RunDir.LINEAGE, [asdict(c) for c in [*lineage, clone]])
