"""What a tuning experiment's trials, ``--resume`` and ``finalize`` need to know about it, written once
as ``<experiment>/cpsc/setup.json`` by the driver."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from cpsc_ray.cluster.recovery import COLLECTIVE_TIMEOUT_S, START_TIMEOUT_S, Recovery
from cpsc_ray.config import ConfigError
from cpsc_ray.storage import Storage


@dataclass(frozen=True)
class TuneSetup:
    base: dict[str, Any]  # the base RunConfig, dumped: every trial starts from it
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

    @staticmethod
    def path(experiment: str) -> str:
        return f"{experiment}/cpsc/setup.json"

    def write(self, root: Storage) -> None:
        root.write_json(self.path(self.experiment), asdict(self))

    @classmethod
    def read(cls, root: Storage, experiment: str) -> TuneSetup:
        if not root.exists(cls.path(experiment)):
            raise ConfigError(f"{experiment}: no tuning experiment of that name under {root.uri()} (give --storage)")
        stored = root.read_json(cls.path(experiment))
        stored.setdefault("max_restarts", stored.get("max_failures", 0))  # its name before Tune's retries had theirs
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})
