"""Where runs and experiments keep their files under a storage root: the one module that names them. Every
writer and reader asks it; no other module spells one of these names or joins one of these paths::

    <root>/
      <run>/                     a distill run (RunDir); with --workers also Ray Train's run directory
        config.yaml              the full config the run used
        metrics.parquet          one row per epoch (results.schema.SCHEMA)
        checkpoints/last/        a checkpoint (CheckpointDir) every train.checkpoint_every epochs
        checkpoints/previous/    the one before, kept while last is rewritten
        checkpoint_*/            Ray Train's checkpoints of a distributed run, in the same format
        best/                    student.safetensors + student.json (finalize adds student.pt2)
        samples.png  summary.json  tensorboard/  report/
      <experiment>/              a tuning experiment (ExperimentDir): Ray Tune's own files, and
        cpsc/setup.json          the experiment's record (cluster.tune.record)
        cpsc/trials/<trial>/     each trial's RunDir: also config.json and, after PBT clones, lineage.json
        cpsc/rounds/<trial>/     the Ray Train runs of a multi-worker trial
      <experiment>-final/        a finalize rerun (ExperimentDir): finalize.json, and a RunDir per seed
      results/<table>/dataset=<dataset>/experiment=<experiment>/part-0.parquet     the results tables

Names only: what the files hold is their writers' business. The names are those of every earlier version,
so old run and experiment directories read as they are.
"""

from __future__ import annotations

import datetime as dt

from cpsc_ray.storage import Storage


class CheckpointDir:
    """The files of one checkpoint, whichever directory holds it (a run's ``checkpoints/last``, a Ray checkpoint)."""

    STATE = "state.pt"  # the engine's state, for torch.load(weights_only=True)
    META = "meta.json"  # the run's bookkeeping at that epoch
    # A multi-worker PBT round's Tune checkpoint holds only this: the address of the round's checkpoint.
    POINTER = "pointer.json"


class RunDir(Storage):
    """One run's directory: a distill run, a tuning trial or a finalize seed."""

    CONFIG = "config.yaml"
    METRICS = "metrics.parquet"
    SUMMARY = "summary.json"
    SAMPLES = "samples.png"
    TENSORBOARD = "tensorboard"
    REPORT = "report"
    LAST_CHECKPOINT = "checkpoints/last"
    PREVIOUS_CHECKPOINT = "checkpoints/previous"  # the last complete one, kept while ``LAST_CHECKPOINT`` is rewritten
    RAY_CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train names its checkpoint directories so
    BEST = "best"  # the student at the best selection metric: weights, card and (after finalize) a program
    BEST_FILES = ("student.safetensors", "student.json", "student.pt2")
    BEST_WEIGHTS = f"{BEST}/{BEST_FILES[0]}"
    BEST_CARD = f"{BEST}/{BEST_FILES[1]}"
    BEST_PROGRAM = f"{BEST}/{BEST_FILES[2]}"
    TRIAL_CONFIG = "config.json"  # a tuning trial's config, flattened, as it last ran
    LINEAGE = "lineage.json"  # the PBT clones a trial's state went through
    FAULT_MARKER = ".fault-injected"  # --inject-fault-at-epoch fired once

    def metric_rows(self) -> list[dict]:
        """The rows of ``metrics.parquet``; none before the run has finished an epoch."""
        return self.read_parquet(self.METRICS).to_pylist() if self.exists(self.METRICS) else []

    def ray_checkpoints(self) -> list[str]:
        """The checkpoint directories Ray Train wrote into it (relative to it)."""
        return [d for d in self.list_dirs() if d.startswith(self.RAY_CHECKPOINT_PREFIX)]

    def checkpoints(self) -> list[str]:
        """Its checkpoint directories (relative to it), whichever mode wrote them: Ray Train's, and an in-process
        run's ``checkpoints/last`` with the ``checkpoints/previous`` it keeps while ``last`` is rewritten."""
        return self.ray_checkpoints() + [self.LAST_CHECKPOINT, self.PREVIOUS_CHECKPOINT]


def trial_dir(trials: str, trial_id: str) -> RunDir:
    """A tuning trial's directory, in its experiment's trials folder (the URI the experiment's record holds)."""
    return RunDir(Storage(trials).uri(trial_id))


def trial_rounds(rounds: str, trial_id: str) -> Storage:
    """Where a multi-worker trial's Ray Train runs go, in its experiment's rounds folder (as its record holds it)."""
    return Storage(rounds).child(trial_id)


class ExperimentDir(Storage):
    """A tuning experiment's directory (Ray Tune's experiment directory), or a finalize rerun's."""

    RECORD = "cpsc/setup.json"
    TRIALS = "cpsc/trials"
    ROUNDS = "cpsc/rounds"
    FINALIZE = "finalize.json"  # a finalize rerun's outcome

    def trial(self, trial_id: str) -> RunDir:
        return trial_dir(self.uri(self.TRIALS), trial_id)

    def trial_ids(self) -> list[str]:
        return self.list_dirs(self.TRIALS)

    def seed_run(self, seed_id: str) -> RunDir:
        """A finalize rerun's seed: a run directory of its own in the rerun's directory."""
        return RunDir(self.uri(seed_id))


class ResultsDir:
    """The results tables: ``results/<table>/dataset=<dataset>/experiment=<experiment>/part-0.parquet``, one
    Hive partition per experiment, which its publisher replaces whole."""

    NAME = "results"
    EPOCHS, TRIALS, LINEAGE = "epochs", "trials", "lineage"
    PARTITIONS = ("dataset", "experiment")

    @classmethod
    def part(cls, table: str, dataset: str, experiment: str) -> str:
        """A partition's file, relative to the results directory."""
        return f"{table}/dataset={dataset}/experiment={experiment}/part-0.parquet"

    @classmethod
    def at(cls, location: Storage) -> Storage | None:
        """The results directory a location is or holds (a storage root), or None."""
        for candidate in (location, location.child(cls.NAME)):
            if candidate.exists(cls.EPOCHS):
                return candidate
        return None


class RootDir(Storage):
    """A storage root: runs and experiments by name, and the results of them all."""

    def run(self, name: str) -> RunDir:
        return RunDir(self.uri(name))

    def experiment(self, name: str) -> ExperimentDir:
        return ExperimentDir(self.uri(name))

    def results(self) -> Storage:
        return self.child(ResultsDir.NAME)

    def free_name(self, name: str) -> str:
        """``name`` when free, else ``name-<timestamp>``: a new run or experiment never writes into an old one."""
        if not self.exists(name):
            return name
        return f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"

    def run_of(self, kind: str, experiment: str, trial_id: str) -> RunDir:
        """The directory of a run as the results name it (its kind, experiment and trial id)."""
        if kind == "tune":
            return self.experiment(experiment).trial(trial_id)
        if kind == "finalize":
            return self.experiment(experiment).seed_run(trial_id)
        return self.run(experiment)
