"""One Ray Tune trial. A trial with one worker runs the epoch loop inside the Tune trainable: one Tune
report per epoch, a checkpoint at every PBT boundary. A trial with several workers runs "rounds": each
Tune iteration is one short Ray Train run of ``checkpoint_every`` epochs that starts from the state a
pointer checkpoint names, since Train V2 gives Tune no checkpoint by itself. PBT's exploit arrives as
the checkpoint of another trial: the trial continues from that state (recorded in its lineage) with
its own, perturbed, hyperparameters."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune import Checkpoint

from cpsc_ray.cluster.train import WorkerLoop, reported_metrics, scaling, train_loop_per_worker
from cpsc_ray.cluster.tune_setup import TuneSetup
from cpsc_ray.config import RunConfig, flatten, with_values
from cpsc_ray.method.engine import DivergenceError
from cpsc_ray.runs.checkpoints import read_checkpoint, write_checkpoint_dir
from cpsc_ray.runs.lineage import Exploit, last_clone_is, read_lineage
from cpsc_ray.runs.loop import Reporter, StartState, run_epochs
from cpsc_ray.runs.run import DistillRun
from cpsc_ray.runs.setup import RunRole, prepare_engine
from cpsc_ray.storage import Storage

WORST_SCORE = -1.0  # below every accuracy: a diverged trial ranks last and PBT replaces it
POINTER = "pointer.json"


def trial_seed_offset(trial_id: str) -> int:
    """Distinct seeds per trial: the index random search puts in its ids ("5f3a1_00003"), else (Optuna's
    ids carry none) a number derived from the id."""
    head, _, tail = trial_id.rpartition("_")
    return int(tail) if head and tail.isdigit() else int(hashlib.sha256(trial_id.encode()).hexdigest()[:6], 16)


def trial_config(base: RunConfig, values: dict[str, Any], trial_id: str) -> RunConfig:
    """The base config with the trial's sampled values (ints rounded: PBT perturbs by factors) and its own seed."""
    kinds = {k: type(v) for k, v in flatten(base).items()}
    coerced = {k: int(round(v)) if kinds.get(k) is int and isinstance(v, float) else v for k, v in values.items()}
    return with_values(base, {**coerced, "seed": base.seed + trial_seed_offset(trial_id), "name": trial_id})


def tune_metrics(row: dict[str, Any], history: list[dict[str, Any]], metric: str, images_spent: int) -> dict[str, Any]:
    """What a trial reports to Tune: the row's numbers; ``score``, the objective's current value (what
    PBT and ASHA compare); ``best_score``, its best so far (what Optuna optimises, and what finalize and
    the report rank by); and ``images_spent``, the images synthesized since the last report (what a
    compute budget adds up)."""
    metrics = reported_metrics(row)
    values = [r[metric] for r in history if r.get(metric) is not None]
    metrics["score"] = WORST_SCORE if row.get("diverged") or not values else values[-1]
    metrics["best_score"] = max(values) if values else WORST_SCORE
    metrics["images_spent"] = images_spent
    metrics["report_id"] = uuid.uuid4().hex  # Tune repeats a finished trial's last result; count it once
    return metrics


def load_trial_checkpoint(directory: str, where: str) -> StartState:
    """The state a trial checkpoint holds: the state itself, or (multi-worker rounds) a pointer to it.
    ``directory`` is where it is read, ``where`` its address (a remote checkpoint's differ)."""
    local = Storage(directory)
    if local.exists(POINTER):
        target = local.read_json(POINTER)["state"]
        return StartState(*read_checkpoint(Storage(target)), where=target)
    return StartState(*read_checkpoint(local), where=where)


def trial_start(trial_id: str, cfg: RunConfig, outputs: Storage) -> StartState | None:
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
    before = outputs.read_json("config.json") if outputs.exists("config.json") else None
    exploit = Exploit(start.trial_id, start.epoch, start.where, before, flatten(cfg))
    return StartState(start.state, start.meta, start.where, exploit)


def tune_trial(config: dict[str, Any], setup: TuneSetup) -> None:
    """The Tune trainable: one trial of the experiment."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(RunConfig.model_validate(setup.base), config, trial_id)
    outputs = Storage(setup.trials).child(trial_id)
    start = trial_start(trial_id, cfg, outputs)
    outputs.write_json("config.json", flatten(cfg))
    if setup.workers > 1:
        _trial_in_rounds(cfg, setup, trial_id, outputs, start)
    else:
        _trial_in_process(cfg, setup, trial_id, outputs, start)


class TuneReporter(Reporter):
    """One Tune report per epoch; the state goes with it at every PBT boundary."""

    def __init__(self, setup: TuneSetup, cfg: RunConfig):
        self.setup, self.cfg = setup, cfg

    def epoch_done(self, run: DistillRun, row: dict[str, Any], checkpoint_due: bool) -> None:
        metrics = tune_metrics(row, run.history, self.setup.metric, row["epoch_images"])
        if not checkpoint_due:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            write_checkpoint_dir(Path(directory), run.checkpoint_files())
            tune.report(metrics, checkpoint=Checkpoint.from_directory(directory))

    def diverged(self, run: DistillRun, row: dict[str, Any], error: DivergenceError) -> None:
        report_diverged(row, run.history, self.setup, self.cfg)


def _trial_in_process(cfg: RunConfig, setup: TuneSetup, trial_id: str, outputs: Storage, start) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    role = RunRole("tune", setup.experiment, trial_id, setup.method, setup.metric)
    prepared = prepare_engine(cfg, device, role)
    run = DistillRun(prepared.engine, prepared.identity, outputs, keep_best=False)
    run_epochs(run, TuneReporter(setup, cfg), start=start, checkpoint_every=setup.checkpoint_every, finish=False)


def report_diverged(row: dict[str, Any], history: list[dict[str, Any]], setup: TuneSetup, cfg: RunConfig) -> None:
    """Report the worst score; under PBT keep the population's pace until a better trial is cloned in."""
    metrics = tune_metrics(row, history, setup.metric, row.get("epoch_images") or 0)
    if not setup.population_based:
        tune.report(metrics)
        return
    for epoch in range(int(row["epoch"]), cfg.train.epochs + 1):
        idle = {"images_spent": 0, "report_id": uuid.uuid4().hex} if epoch != row["epoch"] else {}
        tune.report({**metrics, "epoch": epoch, **idle})


def _round_trainer(cfg: RunConfig, setup: TuneSetup, loop: WorkerLoop, rounds: Storage, name: str):
    from ray.train import CheckpointConfig, FailureConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=scaling(setup.workers, setup.gpus_per_worker, setup.cpus_per_worker),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=rounds.uri(),
            failure_config=FailureConfig(max_failures=setup.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )


def _trial_in_rounds(cfg: RunConfig, setup: TuneSetup, trial_id: str, outputs: Storage, start) -> None:
    # Rounds of several trials can be ready at once; a round's worker group then waits for its turn
    # instead of failing at Train's 60 s start timeout (the variable reaches Train's controller).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(24 * 3600))
    rounds = Storage(setup.rounds).child(trial_id)
    state_uri = start.where if start else None
    epoch = start.epoch if start else 0
    exploit = start.exploit if start else None
    if exploit is not None:
        # Our own copy of the cloned state: the source may drop that round before ours gets workers.
        clone = f"e{epoch:05d}-clone-{uuid.uuid4().hex[:8]}"
        rounds.copy_in(state_uri, clone)
        state_uri = rounds.uri(clone)
    role = RunRole("tune", setup.experiment, trial_id, setup.method, setup.metric)
    while epoch < cfg.train.epochs:
        stop = min(epoch + setup.checkpoint_every, cfg.train.epochs)
        name = f"e{epoch:05d}-{uuid.uuid4().hex[:8]}"  # a fresh name: Train V2 would resume a reused one
        loop = WorkerLoop(
            config=cfg.model_dump(),
            outputs=outputs.uri(),
            role=role,
            start_state=state_uri,
            exploit=exploit,
            stop_epoch=stop,
            checkpoint_every=setup.checkpoint_every,
            keep_best=False,
        )
        result = _round_trainer(cfg, setup, loop, rounds, name).fit()
        exploit = None
        history = outputs.read_parquet("metrics.parquet").to_pylist()
        spent = sum(r["epoch_images"] or 0 for r in history if r["epoch"] > epoch)
        if history[-1]["diverged"]:
            report_diverged({**history[-1], "epoch_images": spent}, history, setup, cfg)
            return
        state_uri = rounds.uri(name, Path(result.checkpoint.path).name)
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, POINTER).write_text(json.dumps({"state": state_uri}))
            metrics = tune_metrics(history[-1], history, setup.metric, spent)
            tune.report(metrics, checkpoint=Checkpoint.from_directory(directory))
        if setup.keep_checkpoints:
            _drop_old_rounds(rounds, keep=setup.keep_checkpoints)
        epoch = stop


def _drop_old_rounds(rounds: Storage, keep: int) -> None:
    """Rounds are kept like Tune keeps the pointers to them: the latest ones, which a live trial may
    still clone; older ones only fill the disk."""
    for name in rounds.list_dirs()[:-keep]:
        rounds.delete_dir(name)


def trainable(setup: TuneSetup):
    """``tune_trial`` with the experiment's setup bound and each trial's resources."""
    per_worker = {"CPU": setup.cpus_per_worker, "GPU": setup.gpus_per_worker}
    # Multi-worker trials hold their workers through Ray Train; the trainable itself only waits on them.
    resources = per_worker if setup.workers == 1 else {"CPU": 0.01}
    return tune.with_resources(tune.with_parameters(tune_trial, setup=setup), resources)
