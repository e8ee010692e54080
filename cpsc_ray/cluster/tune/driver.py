"""Ray Tune over the engine, the driver's side: random or Optuna search with FIFO or ASHA, and PBT or
PB2 that really exploit (continue from a copy of a better trial's full engine state) and explore
(then run with perturbed hyperparameters that are in effect after the restore). What a trial does is
in ``cluster.tune.trial``. An experiment's files are laid out as
``layout.ExperimentDir`` says."""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, replace
from typing import Any

import ray
from ray import tune

from cpsc_ray.cluster.reach import check_every_node_reads
from cpsc_ray.cluster.recovery import COLLECTIVE_TIMEOUT_S, START_TIMEOUT_S
from cpsc_ray.cluster.resources import Capacity, Request, announcing_waits, check_fits, check_resource_exists
from cpsc_ray.cluster.train import check_gpus_per_worker, on_worker_resources, prepare_teacher
from cpsc_ray.cluster.tune.record import ExperimentRecord
from cpsc_ray.cluster.tune.search_space import SearchSpace, load_search_space
from cpsc_ray.cluster.tune.trial import TRAINABLE_CPUS, trainable
from cpsc_ray.compat import alias_moved_modules, check_restorable
from cpsc_ray.config import Config, flatten
from cpsc_ray.credentials import SECRET_NAME
from cpsc_ray.errors import InputError
from cpsc_ray.layout import ExperimentDir, RootDir
from cpsc_ray.results.schema import config_values
from cpsc_ray.results.tables import NothingToCollect, collect_experiment, read_results
from cpsc_ray.runs.assembly import check_model_names, with_absolute_paths

logger = logging.getLogger(__name__)


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
    seed_defaults: bool = False  # the base config's own values are the first trial's
    storage: str | None = None
    name: str | None = None
    keep_checkpoints: int | None = 3  # per trial; None keeps all
    max_failures: int = 0  # Tune's retries of a failed trial
    max_restarts: int = 0  # Ray Train's restarts of a multi-worker trial's worker group, within one try
    start_timeout_s: float = START_TIMEOUT_S  # how long a multi-worker trial's worker group waits for resources
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S
    driver_resource: str | None = None  # keep multi-worker trials' own processes on nodes that carry it
    search_seed: int = 0
    autoscaling: bool = False  # nodes come on demand though no autoscaler reported its node types

    @property
    def method(self) -> str:
        return self.scheduler if self.scheduler in ("pbt", "pb2") else f"{self.search}+{self.scheduler}"

    @property
    def population_based(self) -> bool:
        return self.scheduler in ("pbt", "pb2")


def objective_metric(cfg: Config, requested: str | None) -> str:
    metric = requested or ("val_acc" if cfg.data.val_size > 0 else "proxy")
    if metric == "val_acc" and cfg.data.val_size == 0:
        raise InputError("--metric val_acc needs a validation split: set data.val_size > 0, or use --metric proxy")
    if metric == "proxy" and cfg.eval.probe_per_class == 0:
        raise InputError("--metric proxy needs a probe set: set eval.probe_per_class > 0, or use --metric val_acc")
    if metric not in ("val_acc", "proxy"):
        raise InputError(f"--metric {metric}: choose val_acc or proxy (test accuracy is never an objective)")
    return metric


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


class RoundCostWarning(tune.Callback):
    """Warns once, with the cost measured on the first finished round, that a PBT round of one epoch
    restarts a multi-worker trial's worker group every epoch."""

    def __init__(self, workers: int):
        self.workers = workers
        self.warned = False

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        if self.warned or "round_overhead_s" not in result:
            return
        self.warned = True
        logger.warning(
            f"--perturbation-interval 1 with {self.workers} workers per trial: every epoch is a round that "
            f"starts the trial's worker group anew, measured at {result['round_overhead_s']:.1f} s per round against "
            f"{result['epoch_s']:.1f} s of training ({trial}); a perturbation interval of K epochs pays it once per K"
        )


# ----- the driver ----------------------------------------------------------------------------------
def build_search(options: TuneOptions, space: SearchSpace, metric_mode: tuple, seeds: list[dict] | None):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if options.search == "optuna":
        if options.population_based:
            raise InputError(
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
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

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
    common = dict(
        time_attr="epoch", metric="score", mode="max", perturbation_interval=options.perturbation_interval, synch=True
    )
    if options.scheduler == "pbt":
        from cpsc_ray.cluster.tune.schedulers import AlignedPBT

        return AlignedPBT(hyperparam_mutations=space.pbt_mutations(), custom_explore_fn=space.clamp, **common)
    from cpsc_ray.cluster.tune.schedulers import AlignedPB2

    return AlignedPB2(hyperparam_bounds=space.pb2_bounds(), **common)


def seed_configs(root: RootDir, experiment: str, space: SearchSpace, population: int) -> list[dict[str, Any]]:
    """The best configurations of an earlier experiment, cycled to fill a population of this size."""
    trials = read_results([root.results().uri()], experiments=[experiment]).trials
    if trials.empty:
        raise InputError(f"--seed-from {experiment}: no trials of that experiment under {root.results().uri()}")
    ranked = trials.sort_values("score", ascending=False).head(population)
    searched = ExperimentRecord.read(root, experiment).searched_keys
    keys = sorted(set(searched) | set(space.params))
    configs = [{k: v for k, v in config_values(row).items() if k in keys} for _, row in ranked.iterrows()]
    return [configs[i % len(configs)] for i in range(population)]


def defaults_point(cfg: Config, space: SearchSpace) -> dict[str, Any]:
    """The base config's values of the searched keys: a starting point at the defaults."""
    values = flatten(cfg)
    return {key: values[key] for key in space.params}


def run_tune(
    cfg: Config, options: TuneOptions, resume: bool = False, callbacks: list | None = None, or_start: bool = False
) -> dict[str, Any]:
    """Run (or with ``resume`` continue) a tuning experiment; returns its collected summary. ``or_start``:
    continue the experiment ``options.name`` when Tune can restore it, else start it under exactly that name.
    ``callbacks`` are Ray Tune callbacks, for programmatic use."""
    request = trial_request(options)
    check_gpus_per_worker(options.workers_per_trial, options.gpus_per_worker, request.how)
    cfg = with_absolute_paths(cfg)
    root = RootDir(options.storage or cfg.output_dir)
    _keep_credentials_out_of_trials()
    if resume or (or_start and tune.Tuner.can_restore(root.uri(options.name))):
        return _resume(root, options)
    space = load_search_space(options.space, cfg)
    metric = _checked(cfg, options, space)
    seeds = seed_configs(root, options.seed_from, space, options.num_samples) if options.seed_from else None
    named = options.name or f"{cfg.name}-{options.method.replace('+', '-')}"
    experiment = named if or_start else root.free_name(named)
    if not ray.is_initialized():  # only once the request is known to be valid
        ray.init()
    _check_cluster(request, options)
    cfg = on_worker_resources(options.gpus_per_worker, prepare_teacher, cfg)  # once, before trials start
    check_every_node_reads(root, cfg)
    record = _new_record(root, cfg, options, space, experiment, metric)
    record.write(root)
    if options.seed_defaults:  # a search that starts where the shipped defaults are cannot end below them
        seeds = [defaults_point(cfg, space), *(seeds or [])][: options.num_samples]
    tuner = _tuner(record, options, space, seeds, cfg.train.epochs, root, list(callbacks or []))
    with announcing_waits(request):
        return _collect(root, experiment, tuner.fit())


def _checked(cfg: Config, options: TuneOptions, space: SearchSpace) -> str:
    """The objective metric, once the options, the space and the config's model names agree (before Ray starts)."""
    if options.population_based:
        space.check_perturbable(options.scheduler)
        if options.max_concurrent:
            raise InputError(
                f"--max-concurrent with --scheduler {options.scheduler}: a synchronous population runs its trials as "
                "the cluster holds them (a trial paused at a perturbation frees its resources for the next), so a cap "
                "is not applied; size the population with --num-samples, or give each trial more with "
                "--cpus-per-worker / --gpus-per-trial"
            )
    if options.minimize_device_seconds and options.search != "optuna":
        raise InputError("--minimize-device-seconds is a multi-objective Optuna search: use --search optuna")
    if options.minimize_device_seconds and options.scheduler == "asha":
        raise InputError(
            "--minimize-device-seconds with --scheduler asha: trials ASHA stops would enter the Pareto front at "
            "their early, cheap values; use --scheduler fifo"
        )
    if options.seed_defaults and options.search == "optuna":
        space.check_holds(defaults_point(cfg, space), "--seed-defaults with --search optuna")
    check_model_names(cfg)
    return objective_metric(cfg, options.metric)


def _tuner(
    record: ExperimentRecord,
    options: TuneOptions,
    space: SearchSpace,
    seeds: list[dict] | None,
    epochs: int,
    root: RootDir,
    callbacks: list,
) -> tune.Tuner:
    # Optuna ranks a trial by its best epoch, as finalize and the report do; schedulers compare the current score.
    objectives = (
        (["best_score", "device_s"], ["max", "min"]) if options.minimize_device_seconds else ("best_score", "max")
    )
    random.seed(options.search_seed)  # PBT's explore draws from Python's random
    if options.population_based and options.workers_per_trial > 1 and options.perturbation_interval == 1:
        callbacks.append(RoundCostWarning(options.workers_per_trial))
    return tune.Tuner(
        trainable(record),
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(  # metric and mode live in the searcher and the scheduler
            search_alg=build_search(options, space, objectives, seeds),
            scheduler=build_scheduler(options, space, epochs),
            num_samples=options.num_samples,
            max_concurrent_trials=(options.max_concurrent or _fitting_concurrency(options))
            if options.search == "optuna"
            else None,
            # A population pauses every trial at each boundary: a reused process skips its start-up each time.
            reuse_actors=options.population_based,
        ),
        run_config=tune.RunConfig(
            name=record.experiment,
            storage_path=root.uri(),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=options.keep_checkpoints),
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            stop=ComputeBudget(options.budget_images) if options.budget_images else None,
            callbacks=callbacks,
            verbose=1,
        ),
    )


def _keep_credentials_out_of_trials() -> None:
    """Ray Tune copies the driver's AWS credentials into every trial's runtime env, which the dashboard shows and
    each node's runtime env agent logs. Trials take them from their node's own environment instead, as every
    cpsc-ray process does (``cpsc_ray.credentials``), so Tune is left to copy only variables that hold no secret."""
    from ray.tune.execution import class_cache

    propagated = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = {name for name in propagated if not SECRET_NAME.search(name)}


def _check_cluster(request: Request, options: TuneOptions) -> None:
    """Refuse trials the cluster can never hold, or a driver resource no node carries; warn when rounds of a
    population larger than the cluster will take turns, each waiting up to the start timeout."""
    check_fits(request, options.autoscaling)
    if options.workers_per_trial == 1:
        return
    if options.driver_resource:
        check_resource_exists(options.driver_resource, "--driver-resource", options.autoscaling)
    at_once = _fitting_concurrency(options)
    if options.population_based and at_once < options.num_samples:
        logger.warning(
            f"{options.num_samples} trials, {at_once} at a time: their rounds take turns for workers, and a round "
            f"fails after waiting --start-timeout {options.start_timeout_s:g} s; set it above a round's length"
        )


def trial_request(options: TuneOptions) -> Request:
    """What the trials ask of the cluster: one trial's workers, times the trials asked to run at once."""
    gpus_per_trial = options.gpus_per_worker * options.workers_per_trial
    how = f"--gpus-per-trial {gpus_per_trial:g} --workers-per-trial {options.workers_per_trial}"
    how += f" --cpus-per-worker {options.cpus_per_worker:g}"
    if options.max_concurrent:
        how += f" --max-concurrent {options.max_concurrent}"
    return Request(
        options.workers_per_trial,
        options.cpus_per_worker,
        options.gpus_per_worker,
        how,
        groups=options.max_concurrent or 1,
        group_cpus=TRAINABLE_CPUS if options.workers_per_trial > 1 else 0.0,
    )


def _resume(root: RootDir, options: TuneOptions) -> dict[str, Any]:
    if not options.name:
        raise InputError("--resume NAME: the name of the experiment to continue")
    path = root.uri(options.name)
    if not tune.Tuner.can_restore(path):
        raise InputError(f"--resume: no Tune experiment at {path}")
    check_restorable(root, options.name)
    alias_moved_modules()
    if not ray.is_initialized():  # only once there is an experiment to continue
        ray.init()
    record = ExperimentRecord.read(root, options.name)
    check_every_node_reads(root, Config.model_validate(record.base))  # the cluster may have changed meanwhile
    tuner = tune.Tuner.restore(path, trainable=trainable(record), resume_errored=True)
    with announcing_waits(trial_request(TuneOptions(**record.options))):
        return _collect(root, options.name, tuner.fit())  # finished trials are not rerun


def _new_record(
    root: RootDir, cfg: Config, options: TuneOptions, space: SearchSpace, experiment: str, metric: str
) -> ExperimentRecord:
    directory = root.experiment(experiment)
    return ExperimentRecord(
        base=cfg.model_dump(),
        experiment=experiment,
        method=options.method,
        metric=metric,
        trials=directory.uri(ExperimentDir.TRIALS),
        rounds=directory.uri(ExperimentDir.ROUNDS),
        workers=options.workers_per_trial,
        gpus_per_worker=options.gpus_per_worker,
        cpus_per_worker=options.cpus_per_worker,
        max_restarts=options.max_restarts,
        start_timeout_s=options.start_timeout_s,
        collective_timeout_s=options.collective_timeout_s,
        driver_resource=options.driver_resource,
        # Population-based trials checkpoint at every perturbation boundary: PBT clones those states.
        checkpoint_every=options.perturbation_interval if options.population_based else cfg.train.checkpoint_every,
        keep_checkpoints=options.keep_checkpoints,
        population_based=options.population_based,
        searched_keys=sorted(space.params),
        options=asdict(options),
    )


def _collect(root: RootDir, experiment: str, grid) -> dict[str, Any]:
    errored = [f"{r.path}: {type(r.error).__name__}" for r in grid if r.error is not None]
    for line in errored:
        logger.warning("trial failed: %s (see error.txt there)", line)
    try:
        summary = collect_experiment(root, experiment)
    except NothingToCollect as err:
        if not errored:
            raise
        failed = "; ".join(errored[:3]) + ("; ..." if len(errored) > 3 else "")
        raise NothingToCollect(
            f"{err}: {len(errored)} trial(s) failed ({failed}), and error.txt in each says why; once that is "
            f"fixed, `cpsc-ray tune --resume {experiment} --storage {root.uri()}` reruns them"
        ) from None
    summary["errored"] = errored
    return summary


def _fitting_concurrency(options: TuneOptions) -> int:
    """As many trials at once as the cluster can hold whole at its largest (with the nodes its autoscaler may
    add), so trials queue for nodes that can come and no worker group waits for ones that cannot."""
    request = replace(trial_request(options), groups=1)
    if not request.per_worker:
        return options.num_samples
    return max(1, Capacity.of_cluster().groups(request, most=options.num_samples))
