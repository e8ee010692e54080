"""What a tuning experiment's trials, ``--resume`` and ``finalize`` need to know about it, written once
as ``<experiment>/cpsc/setup.json`` by the driver."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from cpsc_ray.cluster.recovery import COLLECTIVE_TIMEOUT_S, START_TIMEOUT_S, Recovery
from cpsc_ray.compat import current_record_fields
from cpsc_ray.errors import InputError
from cpsc_ray.layout import ExperimentDir, RootDir


@dataclass(frozen=True)
class ExperimentRecord:
    base: dict[str, Any]  # the base Config, dumped: every trial starts from it
    experiment: str
    method: str  # pbt | pb2 | <search>+<scheduler>
    metric: str  # val_acc | proxy: what trials maximise
    trials: str  # where each trial's metrics, lineage and config go
    rounds: str  # where the Ray Train runs of multi-worker trials go
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    checkpoint_every: int  # the PBT perturbation interval for population-based trials
    keep_checkpoints: int | None
    population_based: bool
    searched_keys: list[str]
    options: dict[str, Any]  # the TuneOptions, as given
    # How a multi-worker trial's Train runs recover and wait (absent from experiments older than these fields).
    max_restarts: int = 0
    start_timeout_s: float = START_TIMEOUT_S
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S
    driver_resource: str | None = None  # a custom resource that multi-worker trials' own processes hold a sliver of

    @property
    def recovery(self) -> Recovery:
        return Recovery(self.max_restarts, self.start_timeout_s, self.collective_timeout_s)

    def write(self, root: RootDir) -> None:
        root.experiment(self.experiment).write_json(ExperimentDir.RECORD, asdict(self))

    @classmethod
    def read(cls, root: RootDir, experiment: str) -> ExperimentRecord:
        directory = root.experiment(experiment)
        if not directory.exists(ExperimentDir.RECORD):
            raise InputError(f"{experiment}: no tuning experiment of that name under {root.uri()} (give --storage)")
        stored = current_record_fields(directory.read_json(ExperimentDir.RECORD))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})
