"""Ray Tune over the engine: random or Optuna search with FIFO or ASHA, and PBT or PB2 that really
exploit (continue from a copy of a better trial's full engine state) and explore (then run with
perturbed hyperparameters that are in effect after the restore).

A trial with one worker runs the engine inside the Tune trainable: one Tune report per epoch, a
checkpoint every perturbation interval. A trial with several workers runs "rounds": each Tune
iteration is one short Ray Train run of ``perturbation_interval`` epochs that starts from the state
a pointer checkpoint names, since Train V2 gives Tune no checkpoint by itself.

Layout under the storage root::

    <experiment>/                   Tune's experiment directory (trial dirs, checkpoints, state)
    <experiment>/cpsc/setup.json    what `finalize` and `--resume` need
    <experiment>/cpsc/trials/<id>/  per-trial metrics.parquet, lineage.json, config.json
    <experiment>/cpsc/rounds/<id>/  Ray Train runs of multi-worker trials
    results/                        Parquet of every experiment and run (see results.py)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune import Checkpoint

from cpsc_ray.cluster.search_space import SearchSpace, load_search_space
from cpsc_ray.config import ConfigError, RunConfig, flatten, with_values
from cpsc_ray.method.engine import DivergenceError
from cpsc_ray.results.records import collect_experiment, config_values, latest, read_results
from cpsc_ray.runs.distill import ensure_teacher, new_run_name, prepare_engine
from cpsc_ray.runs.run import (
    DistillRun,
    checkpoint_files,
    read_checkpoint,
    record_exploit,
    restore_engine,
    write_checkpoint_dir,
)
from cpsc_ray.storage import Storage

WORST_SCORE = -1.0  # below every accuracy: a diverged trial ranks last and PBT replaces it
POINTER = "pointer.json"


@dataclass
class TuneOptions:
    space: str
    scheduler: str = "fifo"  # fifo | asha | pbt | pb2
    search: str = "random"  # random | optuna
    num_samples: int = 8
    metric: str | None = None  # val_acc | proxy; default: val_acc when the config holds a validation split
    minimize_device_seconds: bool = False  # multi-objective Optuna: max metric, min device seconds
    workers_per_trial: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_concurrent: int | None = None
    perturbation_interval: int = 1  # epochs between PBT decisions (and checkpoints)
    budget_images: int | None = None  # stop the experiment once its trials synthesized this many images
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    seed_from: str | None = None
    storage: str | None = None
    name: str | None = None
    keep_checkpoints: int | None = 3  # per trial; None keeps all
    max_failures: int = 0
    search_seed: int = 0

    @property
    def method(self) -> str:
        return self.scheduler if self.scheduler in ("pbt", "pb2") else f"{self.search}+{self.scheduler}"

    @property
    def population_based(self) -> bool:
        return self.scheduler in ("pbt", "pb2")


def objective_metric(cfg: RunConfig, requested: str | None) -> str:
    metric = requested or ("val_acc" if cfg.data.val_size > 0 else "proxy")
    if metric == "val_acc" and cfg.data.val_size == 0:
        raise ConfigError("--metric val_acc needs a validation split: set data.val_size > 0, or use --metric proxy")
    if metric == "proxy" and cfg.eval.probe_per_class == 0:
        raise ConfigError("--metric proxy needs a probe set: set eval.probe_per_class > 0, or use --metric val_acc")
    if metric not in ("val_acc", "proxy"):
        raise ConfigError(f"--metric {metric}: choose val_acc or proxy (test accuracy is never an objective)")
    return metric


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


def tune_metrics(row: dict[str, Any], score: float | None, images_spent: int) -> dict[str, Any]:
    """What a trial reports to Tune: the row's numbers, the objective as ``score``, and the images it
    synthesized since its last report (``images_spent``, what a compute budget adds up)."""
    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith("config/")}
    metrics["score"] = WORST_SCORE if row.get("diverged") or score is None else score
    metrics["images_spent"] = images_spent
    metrics["report_id"] = uuid.uuid4().hex  # Tune repeats a finished trial's last result; count it once
    return metrics


class ComputeBudget(tune.Stopper):
    """Ends the experiment once its trials together have synthesized ``images`` images, so search
    methods compare at equal compute (step counts are themselves searched, so trials differ in cost)."""

    def __init__(self, images: int):
        self.images = images
        self.spent = 0
        self.counted: set[str] = set()

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if result.get("report_id") not in self.counted:
            self.counted.add(result.get("report_id"))
            self.spent += int(result.get("images_spent", 0))
        return False

    def stop_all(self) -> bool:
        return self.spent >= self.images


def load_trial_checkpoint(directory: str) -> tuple[dict, dict, str]:
    """(state, meta, where the state lives) from a trial checkpoint: the state itself or a pointer to it."""
    local = Storage(directory)
    if local.exists(POINTER):
        target = local.read_json(POINTER)["state"]
        state, meta = read_checkpoint(Storage(target))
        return state, meta, target
    state, meta = read_checkpoint(local)
    return state, meta, directory


def _previous_config(outputs: Storage) -> dict[str, Any] | None:
    return outputs.read_json("config.json") if outputs.exists("config.json") else None


def tune_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """The Tune trainable: one trial of the experiment."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(RunConfig.model_validate(setup["base"]), config, trial_id)
    outputs = Storage(setup["trials"]).child(trial_id)
    before = _previous_config(outputs)
    outputs.write_json("config.json", flatten(cfg))
    checkpoint = tune.get_checkpoint()
    exploit = None
    start: tuple[dict, dict, str] | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = load_trial_checkpoint(directory)
        source = start[1]["identity"]["trial_id"]
        lineage = outputs.read_json("lineage.json") if outputs.exists("lineage.json") else []
        # A paused trial is restored from its latest checkpoint, which may be the clone it already recorded.
        if source != trial_id and not (lineage and lineage[-1]["source_checkpoint"] == start[2]):
            exploit = {
                "source_trial_id": source,
                "epoch": start[1]["epoch"],
                "source_checkpoint": start[2],
                "config_before": before,
                "config_after": flatten(cfg),
            }
    if setup["workers"] > 1:
        _trial_in_rounds(cfg, setup, trial_id, outputs, start, exploit)
    else:
        _trial_in_process(cfg, setup, trial_id, outputs, start, exploit)


def _trial_in_process(cfg: RunConfig, setup: dict, trial_id: str, outputs: Storage, start, exploit) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prepared = prepare_engine(
        cfg, device, kind="tune", trial_id=trial_id, experiment=setup["experiment"], method=setup["method"]
    )
    engine = prepared.engine
    run = DistillRun(engine, prepared.identity, outputs, setup["metric"], keep_best=False)
    if start is not None:
        state, meta, where = start
        restore_engine(engine, state, where)
        run.resume_from(meta)
        if exploit is not None:
            record_exploit(outputs, engine, exploit)
    score = run.last_score()
    interval = setup["checkpoint_every"]
    while not run.done:
        try:
            row = run.run_epoch()
        except DivergenceError:
            _report_diverged(run.history[-1], setup, cfg)
            return
        score = row[setup["metric"]] if row[setup["metric"]] is not None else score
        metrics = tune_metrics(row, score, row["epoch_images"])
        if engine.epoch % interval == 0 or run.done:
            with tempfile.TemporaryDirectory() as directory:
                write_checkpoint_dir(Path(directory), checkpoint_files(engine, run.meta()))
                tune.report(metrics, checkpoint=Checkpoint.from_directory(directory))
        else:
            tune.report(metrics)


def _report_diverged(row: dict[str, Any], setup: dict, cfg: RunConfig) -> None:
    """Report the worst score; under PBT keep the population's pace until a better trial is cloned in."""
    metrics = tune_metrics(row, None, row.get("epoch_images") or 0)
    if not setup["population_based"]:
        tune.report(metrics)
        return
    for epoch in range(int(row["epoch"]), cfg.train.epochs + 1):
        idle = {"images_spent": 0, "report_id": uuid.uuid4().hex} if epoch != row["epoch"] else {}
        tune.report({**metrics, "epoch": epoch, **idle})


def _trial_in_rounds(cfg: RunConfig, setup: dict, trial_id: str, outputs: Storage, start, exploit) -> None:
    from ray.train import CheckpointConfig, FailureConfig
    from ray.train.torch import TorchTrainer

    from cpsc_ray.cluster.train import scaling, train_loop_per_worker

    # Rounds of several trials can be ready at once; a round's worker group then waits for its turn
    # instead of failing at Train's 60 s start timeout (the variable reaches Train's controller).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(24 * 3600))
    rounds = Storage(setup["rounds"]).child(trial_id)
    state_uri = start[2] if start else None
    epoch = start[1]["epoch"] if start else 0
    if exploit is not None:
        # Our own copy of the cloned state: the source may drop that round before ours gets workers.
        clone = f"e{epoch:05d}-clone-{uuid.uuid4().hex[:8]}"
        rounds.copy_in(state_uri, clone)
        state_uri = rounds.uri(clone)
    while epoch < cfg.train.epochs:
        stop = min(epoch + setup["checkpoint_every"], cfg.train.epochs)
        name = f"e{epoch:05d}-{uuid.uuid4().hex[:8]}"  # a fresh name: Train V2 would resume a reused one
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": cfg.model_dump(),
                "outputs": outputs.uri(),
                "kind": "tune",
                "trial_id": trial_id,
                "experiment": setup["experiment"],
                "method": setup["method"],
                "start_state": state_uri,
                "stop_epoch": stop,
                "exploit": exploit,
                "selection": setup["metric"],
                "keep_best": False,
            },
            scaling_config=scaling(setup["workers"], setup["gpus_per_worker"], setup["cpus_per_worker"]),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=rounds.uri(),
                failure_config=FailureConfig(max_failures=setup["max_failures"]),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
            ),
        )
        result = trainer.fit()
        exploit = None
        history = outputs.read_parquet("metrics.parquet").to_pylist()
        spent = sum(r["epoch_images"] or 0 for r in history if r["epoch"] > epoch)
        if history[-1]["diverged"]:
            _report_diverged({**history[-1], "epoch_images": spent}, setup, cfg)
            return
        state_uri = rounds.uri(name, Path(result.checkpoint.path).name)
        score = latest(history, setup["metric"])
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, POINTER).write_text(json.dumps({"state": state_uri}))
            tune.report(tune_metrics(history[-1], score, spent), checkpoint=Checkpoint.from_directory(directory))
        if setup["keep_checkpoints"]:
            _drop_old_rounds(rounds, keep=setup["keep_checkpoints"])
        epoch = stop


def _drop_old_rounds(rounds: Storage, keep: int) -> None:
    """Rounds are kept like Tune keeps the pointers to them: the latest ones, which a live trial may
    still clone; older ones only fill the disk."""
    for name in rounds.list_dirs()[:-keep]:
        rounds.delete_dir(name)


# ----- the driver ----------------------------------------------------------------------------------
def build_search(options: TuneOptions, space: SearchSpace, metric_mode: tuple, seeds: list[dict] | None):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if options.search == "optuna":
        if options.population_based:
            raise ConfigError(
                "--search optuna with --scheduler pbt/pb2: Ray refuses a search algorithm with population-based "
                "training; run the Optuna search first, then --scheduler pbt --seed-from THAT_EXPERIMENT"
            )
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        metric, mode = metric_mode
        sampler = (
            optuna.samplers.NSGAIISampler(seed=options.search_seed)
            if isinstance(metric, list)
            else optuna.samplers.TPESampler(seed=options.search_seed)
        )
        return OptunaSearch(metric=metric, mode=mode, sampler=sampler, points_to_evaluate=seeds)
    # A synchronous population must exist whole (paused trials release their resources), so only
    # searches without a population are capped.
    cap = 0 if options.population_based else options.max_concurrent or _fitting_concurrency(options)
    return BasicVariantGenerator(points_to_evaluate=seeds, random_state=options.search_seed, max_concurrent=cap)


def build_scheduler(options: TuneOptions, space: SearchSpace, epochs: int):
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        PopulationBasedTraining,
    )

    if options.scheduler == "fifo":
        return FIFOScheduler()
    if options.scheduler == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            metric="score",
            mode="max",
            max_t=epochs,
            grace_period=options.grace_period,
            reduction_factor=2,
        )
    space.check_perturbable()
    common = dict(
        time_attr="epoch", metric="score", mode="max", perturbation_interval=options.perturbation_interval, synch=True
    )
    if options.scheduler == "pbt":
        return PopulationBasedTraining(hyperparam_mutations=space.to_tune(), **common)
    from ray.tune.schedulers.pb2 import PB2

    return PB2(hyperparam_bounds=space.pb2_bounds(), **common)


def seed_configs(storage: Storage, experiment: str, space: SearchSpace, population: int) -> list[dict[str, Any]]:
    """The best configurations of an earlier experiment, cycled to fill a population of this size."""
    trials = read_results([storage.uri("results")], experiments=[experiment]).trials
    if trials.empty:
        raise ConfigError(f"--seed-from {experiment}: no trials of that experiment under {storage.uri('results')}")
    ranked = trials.sort_values("score", ascending=False).head(population)
    searched = json.loads(storage.read_text(f"{experiment}/cpsc/setup.json"))["searched_keys"]
    keys = sorted(set(searched) | set(space.params))
    configs = [{k: v for k, v in config_values(row).items() if k in keys} for _, row in ranked.iterrows()]
    return [configs[i % len(configs)] for i in range(population)]


def run_tune(
    cfg: RunConfig, options: TuneOptions, resume: bool = False, callbacks: list | None = None
) -> dict[str, Any]:
    """Run (or with ``resume`` continue) a tuning experiment; returns its collected summary.
    ``callbacks`` are Ray Tune callbacks, for programmatic use."""
    from ray.tune import CheckpointConfig, FailureConfig, TuneConfig, Tuner

    root = Storage(options.storage or cfg.output_dir)
    if not ray.is_initialized():
        ray.init()
    if resume:
        if not options.name:
            raise ConfigError("--resume needs --name EXPERIMENT (the experiment to continue)")
        path = root.uri(options.name)
        if not Tuner.can_restore(path):
            raise ConfigError(f"--resume: no Tune experiment at {path}")
        setup = json.loads(root.read_text(f"{options.name}/cpsc/setup.json"))
        trainable = _trainable(setup)
        grid = Tuner.restore(path, trainable=trainable, resume_errored=True).fit()  # finished trials are not rerun
        return _collect(root, options.name, grid)

    space = load_search_space(options.space, cfg)
    if options.population_based:
        space.check_perturbable()
    metric = objective_metric(cfg, options.metric)
    experiment = new_run_name(root, options.name or f"{cfg.name}-{options.method.replace('+', '-')}")
    cfg = _resolve_teacher(cfg, options)
    checkpoint_every = options.perturbation_interval if options.population_based else cfg.train.checkpoint_every
    setup = {
        "base": cfg.model_dump(),
        "experiment": experiment,
        "method": options.method,
        "metric": metric,
        "trials": root.uri(experiment, "cpsc", "trials"),
        "rounds": root.uri(experiment, "cpsc", "rounds"),
        "workers": options.workers_per_trial,
        "gpus_per_worker": options.gpus_per_worker,
        "cpus_per_worker": options.cpus_per_worker,
        "max_failures": options.max_failures,
        "checkpoint_every": checkpoint_every,
        "keep_checkpoints": options.keep_checkpoints,
        "population_based": options.population_based,
        "searched_keys": sorted(space.params),
        "options": asdict(options),
    }
    root.write_json(f"{experiment}/cpsc/setup.json", setup)
    seeds = seed_configs(root, options.seed_from, space, options.num_samples) if options.seed_from else None
    objectives = (["score", "device_s"], ["max", "min"]) if options.minimize_device_seconds else ("score", "max")
    if options.minimize_device_seconds and options.search != "optuna":
        raise ConfigError("--minimize-device-seconds is a multi-objective Optuna search: use --search optuna")
    search = build_search(options, space, objectives, seeds)
    scheduler = build_scheduler(options, space, cfg.train.epochs)
    random.seed(options.search_seed)  # PBT's explore draws from Python's random
    tuner = Tuner(
        _trainable(setup),
        param_space=space.to_tune(),
        tune_config=TuneConfig(  # metric and mode live in the searcher and the scheduler
            search_alg=search,
            scheduler=scheduler,
            num_samples=options.num_samples,
            max_concurrent_trials=(options.max_concurrent or _fitting_concurrency(options))
            if options.search == "optuna"
            else None,
        ),
        run_config=tune.RunConfig(
            name=experiment,
            storage_path=root.uri(),
            checkpoint_config=CheckpointConfig(num_to_keep=options.keep_checkpoints),
            failure_config=FailureConfig(max_failures=options.max_failures),
            stop=ComputeBudget(options.budget_images) if options.budget_images else None,
            callbacks=callbacks,
            verbose=1,
        ),
    )
    return _collect(root, experiment, tuner.fit())


def _collect(root: Storage, experiment: str, grid) -> dict[str, Any]:
    summary = collect_experiment(root, experiment)
    summary["errored"] = [f"{r.path}: {type(r.error).__name__}" for r in grid if r.error is not None]
    for line in summary["errored"]:
        print(f"warning: trial failed: {line} (see error.txt there)")
    return summary


def _trainable(setup: dict[str, Any]):
    per_worker = {"CPU": setup["cpus_per_worker"], "GPU": setup["gpus_per_worker"]}
    # Multi-worker trials hold their workers through Ray Train; the trainable itself only waits on them.
    resources = per_worker if setup["workers"] == 1 else {"CPU": 0.01}
    return tune.with_resources(tune.with_parameters(tune_trial, setup=setup), resources)


def _fitting_concurrency(options: TuneOptions) -> int:
    """As many trials at once as the cluster can hold whole, so no worker group waits on a timeout."""
    available = ray.cluster_resources()
    per_trial = {
        "CPU": options.cpus_per_worker * options.workers_per_trial,
        "GPU": options.gpus_per_worker * options.workers_per_trial,
    }
    fits = [int(available.get(k, 0) // v) for k, v in per_trial.items() if v > 0]
    return max(1, min(fits)) if fits else 1


def _resolve_teacher(cfg: RunConfig, options: TuneOptions) -> RunConfig:
    """Resolve (train if needed) the teacher and make its probe set once, before trials start."""
    from cpsc_ray.cluster.train import on_worker_resources, prepare_probe

    cfg = on_worker_resources(options.gpus_per_worker, ensure_teacher, cfg, False)
    on_worker_resources(options.gpus_per_worker, prepare_probe, cfg)
    return cfg
