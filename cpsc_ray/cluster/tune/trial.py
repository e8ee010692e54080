"""One Ray Tune trial. A trial with one worker runs the epoch loop inside the Tune trainable: one Tune
report per epoch, a checkpoint at every PBT boundary. A trial with several workers runs a Ray Train
run: under random or Optuna search one run for the whole trial, whose rank 0 reports every epoch to
Tune (``TuneReportCallback``) and which keeps its checkpoints itself, so a retried or resumed trial
continues from them. Under PBT or PB2 it runs "rounds": each Tune iteration is one short Train run
of ``checkpoint_every`` epochs that starts from the state a pointer checkpoint names, since Train V2
gives Tune no checkpoint by itself. PBT's exploit arrives as the checkpoint of another trial: the
trial continues from that state (recorded in its lineage) with its own, perturbed, hyperparameters."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import Checkpoint

from cpsc_ray.cluster.metrics import tune_metrics
from cpsc_ray.cluster.recovery import DRIVER_RESOURCE_SHARE
from cpsc_ray.cluster.train import WorkerLoop, build_trainer, scaling
from cpsc_ray.cluster.tune.record import ExperimentRecord
from cpsc_ray.config import Config, flatten, with_values
from cpsc_ray.layout import CheckpointDir, RunDir, trial_dir, trial_rounds
from cpsc_ray.method.engine import DivergenceError
from cpsc_ray.results.lineage import Exploit, last_clone_is, read_lineage
from cpsc_ray.results.tables import charged_images
from cpsc_ray.runs.assembly import RunRole, run_distillation
from cpsc_ray.runs.checkpoints import read_checkpoint, write_checkpoint_dir
from cpsc_ray.runs.loop import EpochHooks, StartState
from cpsc_ray.runs.run import DistillRun
from cpsc_ray.storage import Storage

TRAINABLE_CPUS = 0.01  # what a multi-worker trial's trainable holds besides its workers


def trial_seed_offset(trial_id: str) -> int:
    """Distinct seeds per trial: the index random search puts in its ids ("5f3a1_00003"), else (Optuna's
    ids carry none) a number derived from the id."""
    head, _, tail = trial_id.rpartition("_")
    return int(tail) if head and tail.isdigit() else int(hashlib.sha256(trial_id.encode()).hexdigest()[:6], 16)


def trial_config(base: Config, values: dict[str, Any], trial_id: str) -> Config:
    """The base config with the trial's sampled values (ints rounded: PBT perturbs by factors) and its own seed."""
    kinds = {k: type(v) for k, v in flatten(base).items()}
    coerced = {k: int(round(v)) if kinds.get(k) is int and isinstance(v, float) else v for k, v in values.items()}
    return with_values(base, {**coerced, "seed": base.seed + trial_seed_offset(trial_id), "name": trial_id})


def load_trial_checkpoint(directory: str, where: str) -> StartState:
    """The state a trial checkpoint holds: the state itself, or (multi-worker rounds) a pointer to it.
    ``directory`` is where it is read, ``where`` its address (a remote checkpoint's differ)."""
    local = Storage(directory)
    if local.exists(CheckpointDir.POINTER):
        target = local.read_json(CheckpointDir.POINTER)["state"]
        return StartState(*read_checkpoint(Storage(target)), where=target)
    return StartState(*read_checkpoint(local), where=where)


def trial_start(trial_id: str, cfg: Config, outputs: RunDir) -> StartState | None:
    """Where this trial continues from: nothing, its own checkpoint (a paused or retried trial), or
    another trial's (a PBT exploit, recorded once)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    # A remote checkpoint is read from a temporary local copy; lineage records where it stays. Tune keeps it
    # on the same store as the trial's outputs.
    with checkpoint.as_directory() as directory:
        start = load_trial_checkpoint(directory, outputs.uri_of(checkpoint.path))
    if start.trial_id == trial_id or last_clone_is(read_lineage(outputs), start.where):
        return start
    before = outputs.read_json(RunDir.TRIAL_CONFIG) if outputs.exists(RunDir.TRIAL_CONFIG) else None
    exploit = Exploit(start.trial_id, start.epoch, start.where, before, flatten(cfg))
    return StartState(start.state, start.meta, start.where, exploit)


def tune_trial(config: dict[str, Any], record: ExperimentRecord) -> None:
    """The Tune trainable: one trial of the experiment."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(Config.model_validate(record.base), config, trial_id)
    outputs = trial_dir(record.trials, trial_id)
    start = trial_start(trial_id, cfg, outputs)
    outputs.write_json(RunDir.TRIAL_CONFIG, flatten(cfg))
    if record.workers == 1:
        _trial_in_process(cfg, record, trial_id, outputs, start)
    elif record.population_based:
        _trial_in_rounds(cfg, record, trial_id, outputs, start)
    else:
        _trial_as_one_train_run(cfg, record, trial_id, outputs)


class TrialHooks(EpochHooks):
    """One Tune report per epoch; the state goes with it at every PBT boundary."""

    def __init__(self, record: ExperimentRecord, cfg: Config):
        self.record, self.cfg = record, cfg

    def epoch_done(self, run: DistillRun, row: dict[str, Any], checkpoint_due: bool) -> None:
        metrics = tune_metrics(row, run.history, self.record.metric, row["epoch_images"])
        if not checkpoint_due:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            write_checkpoint_dir(Path(directory), run.checkpoint_files())
            tune.report(metrics, checkpoint=Checkpoint.from_directory(directory))

    def diverged(self, run: DistillRun, row: dict[str, Any], error: DivergenceError) -> None:
        send_diverged_to_tune(row, run.history, self.record, self.cfg)


def _trial_in_process(cfg: Config, record: ExperimentRecord, trial_id: str, outputs: RunDir, start) -> None:
    run_distillation(
        cfg,
        RunRole("tune", record.experiment, trial_id, record.method, record.metric),
        outputs,
        TrialHooks(record, cfg),
        keep_best=False,
        started_at=time.time(),
        start=start,
        checkpoint_every=record.checkpoint_every,
        finish=False,
    )


def send_diverged_to_tune(
    row: dict[str, Any], history: list[dict[str, Any]], record: ExperimentRecord, cfg: Config
) -> None:
    """Report the worst score; under PBT keep the population's pace until a better trial is cloned in."""
    metrics = tune_metrics(row, history, record.metric, row.get("epoch_images") or 0)
    if not record.population_based:
        tune.report(metrics)
        return
    for epoch in range(int(row["epoch"]), cfg.train.epochs + 1):
        idle = {"images_spent": 0, "report_id": uuid.uuid4().hex} if epoch != row["epoch"] else {}
        tune.report({**metrics, "epoch": epoch, **idle})


def _trainer(
    record: ExperimentRecord, loop: WorkerLoop, storage: Storage, name: str, keep: int, callbacks: list | None = None
):
    shape = scaling(record.workers, record.gpus_per_worker, record.cpus_per_worker)
    return build_trainer(loop, shape, name, storage, record.recovery, keep, callbacks)


def _trial_as_one_train_run(cfg: Config, record: ExperimentRecord, trial_id: str, outputs: RunDir) -> None:
    """The whole trial as one Train run named after the trial: a retried trial or ``tune --resume``
    starts the same run again, and Train continues it from its newest checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    loop = WorkerLoop(
        config=cfg.model_dump(),
        outputs=outputs.uri(),
        role=RunRole("tune", record.experiment, trial_id, record.method, record.metric),
        checkpoint_every=cfg.train.checkpoint_every,
        keep_best=False,
        launched_at=time.time(),
    )
    keep = record.keep_checkpoints or 2
    _trainer(record, loop, Storage(record.rounds), trial_id, keep, callbacks=[TuneReportCallback()]).fit()
    history = outputs.metric_rows()
    if history[-1]["diverged"]:  # rank 0 reports no diverged epoch: the trial's last word is the worst score
        send_diverged_to_tune(history[-1], history, record, cfg)


def _trial_in_rounds(cfg: Config, record: ExperimentRecord, trial_id: str, outputs: RunDir, start) -> None:
    rounds = trial_rounds(record.rounds, trial_id)
    state_uri = start.where if start else None
    epoch = start.epoch if start else 0
    exploit = start.exploit if start else None
    if exploit is not None:
        # Our own copy of the cloned state: the source may drop that round before ours gets workers.
        clone = f"e{epoch:05d}-clone-{uuid.uuid4().hex[:8]}"
        rounds.copy_in(state_uri, clone)
        state_uri = rounds.uri(clone)
    role = RunRole("tune", record.experiment, trial_id, record.method, record.metric)
    while epoch < cfg.train.epochs:
        stop = min(epoch + record.checkpoint_every, cfg.train.epochs)
        name = f"e{epoch:05d}-{uuid.uuid4().hex[:8]}"  # a fresh name: Train V2 would resume a reused one
        loop = WorkerLoop(
            config=cfg.model_dump(),
            outputs=outputs.uri(),
            role=role,
            start_state=state_uri,
            exploit=exploit,
            stop_epoch=stop,
            checkpoint_every=record.checkpoint_every,
            keep_best=False,
            launched_at=time.time(),
        )
        launched = time.perf_counter()
        result = _trainer(record, loop, rounds, name, keep=1).fit()
        exploit = None
        history = outputs.metric_rows()
        this_round = [r for r in history if r["epoch"] > epoch]
        spent = charged_images(this_round)  # with epochs a restart inside the round lost
        if history[-1]["diverged"]:
            send_diverged_to_tune({**history[-1], "epoch_images": spent}, history, record, cfg)
            return
        state_uri = rounds.uri(name, Path(result.checkpoint.path).name)
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, CheckpointDir.POINTER).write_text(json.dumps({"state": state_uri}))
            metrics = tune_metrics(history[-1], history, record.metric, spent)
            # What the round cost beyond its epochs: the driver warns when that dominates.
            metrics["round_overhead_s"] = time.perf_counter() - launched - sum(r["epoch_s"] for r in this_round)
            tune.report(metrics, checkpoint=Checkpoint.from_directory(directory))
        if record.keep_checkpoints:
            _drop_old_rounds(rounds, keep=record.keep_checkpoints)
        epoch = stop


def _drop_old_rounds(rounds: Storage, keep: int) -> None:
    """Rounds are kept like Tune keeps the pointers to them: the latest ones, which a live trial may
    still clone; older ones only fill the disk."""
    for name in rounds.list_dirs()[:-keep]:
        rounds.delete_dir(name)


def trainable(record: ExperimentRecord):
    """``tune_trial`` with the experiment's record bound and each trial's resources."""
    per_worker = {"CPU": record.cpus_per_worker, "GPU": record.gpus_per_worker}
    # Multi-worker trials hold their workers through Ray Train; the trainable itself only waits on them, on a node
    # that carries the driver resource when one is named (Train's controller follows it there).
    driver = {record.driver_resource: DRIVER_RESOURCE_SHARE} if record.driver_resource else {}
    resources = per_worker if record.workers == 1 else {"CPU": TRAINABLE_CPUS, **driver}
    return tune.with_resources(tune.with_parameters(tune_trial, record=record), resources)
