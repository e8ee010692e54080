"""A run's metrics as TensorBoard scalars, so a run can be watched while it trains: one scalar per
numeric metric of each epoch's row (the names of ``metrics.parquet``'s columns), at step = epoch, in
``<run dir>/tensorboard/``. Tuning trials have none here: Ray Tune's own TensorBoard logger writes
what they report into the experiment directory.

Event files are written for local run directories only: tensorboardX reaches object stores through
boto3 alone, and a run on an S3-compatible store keeps its metrics in ``metrics.parquet`` there."""

from __future__ import annotations

import logging
from typing import Any

from tensorboardX import SummaryWriter

from cpsc_ray.layout import RunDir
from cpsc_ray.results.schema import PROGRESS

logger = logging.getLogger(__name__)

NOT_SCALARS = {"epoch", "diverged"}  # the step itself, and a flag the row's missing metrics already show


def scalars_of(row: dict[str, Any]) -> dict[str, float]:
    """The row's metrics that have a value this epoch (accuracies only on evaluated epochs)."""
    return {name: row[name] for name in PROGRESS if name not in NOT_SCALARS and row.get(name) is not None}


class EpochScalars:
    """Writes each recorded epoch row. A restarted run re-records the epochs its restart lost; the writer
    opens with ``purge_step`` at the first epoch it writes, so TensorBoard drops the lost epochs' points."""

    def __init__(self, outputs: RunDir):
        self.logdir = outputs.path(RunDir.TENSORBOARD)
        self._writer: SummaryWriter | None = None

    @classmethod
    def for_run(cls, outputs: RunDir | None, kind: str) -> EpochScalars | None:
        """The writer of a run's rank 0, or None: other ranks, tuning trials, and runs on remote storage."""
        if outputs is None or kind == "tune":
            return None
        if not outputs.is_local:
            logger.info("no TensorBoard files for %s: they are written for local run directories only", outputs.uri())
            return None
        return cls(outputs)

    def write(self, row: dict[str, Any]) -> None:
        epoch = row["epoch"]
        if self._writer is None:
            # flush() writes only what tensorboardX's writer thread has taken from its queue so far: flush_secs
            # bounds how late the rest of an epoch shows (its default is two minutes).
            self._writer = SummaryWriter(self.logdir, purge_step=epoch, flush_secs=5)
        for name, value in scalars_of(row).items():
            self._writer.add_scalar(name, value, global_step=epoch)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
