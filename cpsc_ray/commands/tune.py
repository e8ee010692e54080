"""``cpsc-ray tune`` and ``cpsc-ray finalize``: search hyperparameters with Ray Tune, then rerun the selected
configuration over seeds and export the students."""

from __future__ import annotations

import argparse

from cpsc_ray.commands import DEFAULT_STORAGE, add_config_args, add_recovery_args, add_run_args, percent
from cpsc_ray.config import load_config
from cpsc_ray.errors import InputError
from cpsc_ray.layout import RunDir


def add_commands(commands: argparse._SubParsersAction) -> None:
    _add_tune(commands)
    final = commands.add_parser("finalize", help="rerun an experiment's selected configuration over seeds, export it")
    final.add_argument("experiment", metavar="EXPERIMENT", help="the tuning experiment's name (as tune printed it)")
    final.add_argument("--seeds", type=int, default=3, help="reruns, each from scratch with its own seed")
    final.add_argument(
        "--storage",
        metavar="LOCATION",
        default=DEFAULT_STORAGE,
        help="where the experiment lives: the --storage or output_dir tune wrote to (default: %(default)s, the "
        "output_dir of every shipped config)",
    )
    final.add_argument("--gpus-per-seed", type=float, default=0.0, help="GPUs of each seed's rerun (0: CPU)")
    final.add_argument("--cpus-per-seed", type=float, default=1.0, help="CPUs of each seed's rerun")
    final.add_argument(
        "--resume-or-start",
        action="store_true",
        help="continue EXPERIMENT-final if it exists (each seed from its newest checkpoint), else start it under "
        "exactly that name, as a job that may run again should (default: a taken name gets a suffix)",
    )
    final.set_defaults(func=cmd_finalize)


def _add_tune(commands: argparse._SubParsersAction) -> None:
    tuning = commands.add_parser("tune", help="search loss weights, temperature and generator settings with Ray Tune")
    add_config_args(tuning)
    tuning.add_argument(
        "--space",
        help="search space: a YAML path or a name in search_spaces/; required for a new experiment (--resume "
        "continues with its own)",
    )
    tuning.add_argument(
        "--scheduler",
        choices=["fifo", "asha", "pbt", "pb2"],
        default="fifo",
        help="fifo: every trial runs to the end; asha: stops poor trials early; pbt, pb2: population-based training",
    )
    tuning.add_argument(
        "--search",
        choices=["random", "optuna"],
        default="random",
        help="how trials draw their values: random sampling, or Optuna's TPE (NSGA-II with --minimize-device-seconds)",
    )
    tuning.add_argument("--num-samples", type=int, default=8, help="trials (the population size for pbt/pb2)")
    tuning.add_argument(
        "--metric",
        choices=["val_acc", "proxy"],
        help="objective (default: val_acc when the config holds a validation split, else proxy)",
    )
    tuning.add_argument(
        "--minimize-device-seconds",
        action="store_true",
        help="multi-objective Optuna (NSGA-II): maximise the metric, minimise device seconds",
    )
    tuning.add_argument("--seed-from", metavar="EXPERIMENT", help="start the PBT population from its best configs")
    tuning.add_argument(
        "--seed-defaults", action="store_true", help="the first trial starts at the config's own values"
    )
    _add_trial_resources(tuning)
    tuning.add_argument("--perturbation-interval", type=int, default=1, help="epochs between PBT decisions")
    tuning.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    tuning.add_argument(
        "--budget-images",
        type=int,
        help="end the experiment once its trials synthesized this many "
        "images in all (compare search methods at equal compute)",
    )
    tuning.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoints kept per trial (0 keeps all)")
    tuning.add_argument("--max-failures", type=int, default=0, help="retries of a failed trial (Ray Tune)")
    tuning.add_argument(
        "--search-seed", type=int, default=0, help="seed of the search's sampling and of PBT's perturbations"
    )
    add_run_args(tuning, "experiment", "<config name>-<method>")
    tuning.set_defaults(func=cmd_tune)


def _add_trial_resources(tuning: argparse.ArgumentParser) -> None:
    """What each trial holds, where its own process runs, and how its Ray Train runs recover."""
    tuning.add_argument("--workers-per-trial", type=int, default=1, help="DDP workers in each trial (Ray Train)")
    tuning.add_argument(
        "--gpus-per-trial", type=float, default=0.0, help="GPUs of each trial, split across its workers"
    )
    tuning.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs of each trial's workers")
    tuning.add_argument(
        "--max-concurrent",
        type=int,
        help="trials at once (default: as many as the cluster holds whole); not with pbt/pb2, whose population runs "
        "as the cluster holds it",
    )
    tuning.add_argument(
        "--driver-resource",
        metavar="NAME",
        help="keep each multi-worker trial's own process, and Ray Train's controller with it, on nodes that carry "
        "this custom resource (the head or on-demand nodes: ray start --resources='{\"NAME\": 1000}'), so a "
        "preempted spot node takes only workers, which Ray Train restarts",
    )
    add_recovery_args(
        tuning.add_argument_group("multi-worker trials (Ray Train)"),
        "restarts of a multi-worker trial's worker group within one try of the trial (Ray Train)",
    )


def cmd_tune(args: argparse.Namespace) -> int:
    from cpsc_ray.cluster.tune import TuneOptions, run_tune

    if not (args.space or args.resume):
        raise InputError(
            "tune: --space is required for a new experiment (a YAML path or a name in search_spaces/; also with "
            "--resume-or-start, which may start one)"
        )
    cfg = load_config(args.config, args.overrides)
    options = TuneOptions(
        space=args.space,
        scheduler=args.scheduler,
        search=args.search,
        num_samples=args.num_samples,
        metric=args.metric,
        minimize_device_seconds=args.minimize_device_seconds,
        workers_per_trial=args.workers_per_trial,
        gpus_per_worker=args.gpus_per_trial / args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker,
        max_concurrent=args.max_concurrent,
        perturbation_interval=args.perturbation_interval,
        budget_images=args.budget_images,
        grace_period=args.grace_period,
        seed_from=args.seed_from,
        seed_defaults=args.seed_defaults,
        storage=args.storage,
        name=args.resume or args.resume_or_start or args.name,
        keep_checkpoints=args.keep_checkpoints or None,
        max_failures=args.max_failures,
        max_restarts=args.max_restarts,
        start_timeout_s=args.start_timeout,
        collective_timeout_s=args.collective_timeout,
        driver_resource=args.driver_resource,
        search_seed=args.search_seed,
        autoscaling=args.autoscaling,
    )
    summary = run_tune(cfg, options, resume=bool(args.resume), or_start=bool(args.resume_or_start))
    print(f"\nexperiment {summary['experiment']}: {len(summary['trials'])} trials; results in {summary['results']}")
    print(f"  {'trial':18s} {'score':>7s} {'test@best':>9s} {'epochs':>6s} {'images':>10s} {'device-s':>9s}")
    for trial in summary["trials"][:10]:
        score = "diverged" if trial["diverged"] else percent(trial["score"])
        print(
            f"  {trial['trial_id']:18s} {score:>7s} {percent(trial['test_at_best']):>9s} {trial['epochs']:>6d} "
            f"{trial['images']:>10,d} {trial['device_s']:>9.0f}"
        )
    print(f"next: cpsc-ray finalize {summary['experiment']} --seeds 3 --storage {args.storage or cfg.output_dir}")
    return 0


def cmd_finalize(args: argparse.Namespace) -> int:
    from cpsc_ray.cluster.finalize import finalize

    result = finalize(
        args.experiment, args.seeds, args.storage, args.gpus_per_seed, args.cpus_per_seed, args.resume_or_start
    )
    print(
        f"\n{args.experiment}: trial {result['winner']} selected (score {percent(result['winner_score'])}); "
        f"{len(result['schedule'])} hyperparameter phase(s) replayed over {result['seeds']} seeds"
    )
    print(
        f"  test accuracy at the best validation epoch: {percent(result['test_mean'])} +/- "
        f"{100 * result['test_std']:.2f} over {len(result['test_at_best'])} seeds"
        + (f" ({result['diverged']} seed(s) diverged)" if result["diverged"] else "")
    )
    weights, card, program = RunDir.BEST_FILES
    for path in result["students"]:
        print(f"  student: {path}/{weights} (+ {card}, {program})")
    return 0
