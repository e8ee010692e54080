"""``cpsc-ray``: train teachers, distil students, show configs.

Every command takes ``--config`` (a YAML path or a shipped config name, default ``digits``) and then
dotted overrides, e.g. ``cpsc-ray distill --name try1 loss.alpha=2 train.epochs=5``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cpsc_ray.config import ConfigError, load_config, shipped_config_names, to_yaml

DEFAULT_CONFIG = "digits"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"YAML path or shipped config ({', '.join(shipped_config_names())}); default: {DEFAULT_CONFIG}",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. loss.alpha=2")


def cmd_config(args: argparse.Namespace) -> int:
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    from cpsc_ray.runs.teacher import card_path, train_teacher

    cfg = load_config(args.config, args.overrides)
    path = train_teacher(cfg, out=Path(args.out) if args.out else None)
    print(f"teacher written to {path}\n{card_path(path).read_text()}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"name={args.name}"] if args.name else [])
    cfg = load_config(args.config, overrides)
    if args.workers:
        from cpsc_ray.cluster.train import DistributedRunError, run_distributed

        try:
            summary = run_distributed(
                cfg,
                args.workers,
                args.gpus_per_worker,
                args.cpus_per_worker,
                args.storage,
                args.max_failures,
                args.resume,
                args.inject_fault_at_epoch,
            )
        except DistributedRunError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    else:
        from cpsc_ray.method.engine import DivergenceError
        from cpsc_ray.runs.distill import run_in_process

        if args.storage:
            cfg = cfg.model_copy(update={"output_dir": args.storage})
        try:
            summary = run_in_process(cfg, resume=args.resume)
        except DivergenceError as err:
            print(
                f"error: {err}; the run's metrics so far are kept: lower student.lr, generator.lr or the loss weights",
                file=sys.stderr,
            )
            return 1
    print_summary(summary)
    report_run(summary)
    return 0


def report_run(summary: dict) -> None:
    """The report of the run just finished, in its run directory when that is local."""
    from cpsc_ray.results.records import ResultsError
    from cpsc_ray.results.report import build_report

    run_dir = summary["run_dir"]
    storage = run_dir.rsplit("/", 1)[0]
    if "://" in run_dir:
        print(f"  report: cpsc-ray report {storage} --experiments {summary['run']} -o REPORT_DIR")
        return
    try:
        page = build_report([storage], Path(run_dir) / "report", [summary["run"]])
    except ResultsError as err:
        print(f"warning: no report for this run: {err}", file=sys.stderr)
        return
    print(f"  report: {page}")
    print(f"  compare every run there: cpsc-ray report {storage} -o {storage}/report")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def print_summary(summary: dict) -> None:
    best, last = summary.get("best") or {}, summary["last"]
    chosen = summary["selected_by"]
    print(
        f"\nrun {summary['run']}: {summary['epochs']} epochs, {summary['images']:,} synthetic images, "
        f"{summary['device_s']:.0f} device-seconds"
    )
    print(f"  teacher test accuracy:        {_pct(summary['teacher_test_acc'])}")
    print(f"  student test accuracy (last): {_pct(last.get('test_acc'))}")
    if chosen.get("metric"):
        selected = f"best by {chosen['metric']}, epoch {chosen['epoch']}"
        print(f"  student test accuracy ({selected}): {_pct(best.get('test_acc'))}")
    for warning in summary.get("warnings", []):
        print(f"  warning: {warning}")
    print(f"  outputs: {summary['run_dir']}")


def cmd_tune(args: argparse.Namespace) -> int:
    from cpsc_ray.cluster.tune import TuneOptions, run_tune

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
        storage=args.storage,
        name=args.name,
        keep_checkpoints=args.keep_checkpoints or None,
        max_failures=args.max_failures,
        search_seed=args.search_seed,
    )
    summary = run_tune(load_config(args.config, args.overrides), options, resume=args.resume)
    print(f"\nexperiment {summary['experiment']}: {len(summary['trials'])} trials; results in {summary['results']}")
    print(f"  {'trial':18s} {'score':>7s} {'test@best':>9s} {'epochs':>6s} {'images':>10s} {'device-s':>9s}")
    for trial in summary["trials"][:10]:
        score = "diverged" if trial["diverged"] else _pct(trial["score"])
        print(
            f"  {trial['trial_id']:18s} {score:>7s} {_pct(trial['test_at_best']):>9s} {trial['epochs']:>6d} "
            f"{trial['images']:>10,d} {trial['device_s']:>9.0f}"
        )
    print(f"next: cpsc-ray finalize {summary['experiment']} --seeds 3 --storage {args.storage or '<output_dir>'}")
    return 0


def cmd_finalize(args: argparse.Namespace) -> int:
    from cpsc_ray.cluster.finalize import finalize

    result = finalize(args.experiment, args.seeds, args.storage, args.gpus_per_seed, args.cpus_per_seed)
    print(
        f"\n{args.experiment}: trial {result['winner']} selected (score {_pct(result['winner_score'])}); "
        f"{len(result['schedule'])} hyperparameter phase(s) replayed over {result['seeds']} seeds"
    )
    print(
        f"  test accuracy at the best validation epoch: {_pct(result['test_mean'])} +/- "
        f"{100 * result['test_std']:.2f} over {len(result['test_at_best'])} seeds"
        + (f" ({result['diverged']} seed(s) diverged)" if result["diverged"] else "")
    )
    for path in result["students"]:
        print(f"  student: {path}/student.safetensors (+ student.json, student.pt2)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cpsc_ray.results.records import ResultsError
    from cpsc_ray.results.report import build_report

    try:
        page = build_report(args.results, args.out, args.experiments)
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {page} (report.md, summary.parquet and cross_dataset.parquet beside it)")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from cpsc_ray.cluster.submit import JobServer, SubmitError, entrypoint, runtime_env, trains_in_driver

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    job_id = args.logs or args.stop or args.status
    try:
        if not job_id:
            entrypoint(command)  # refuse a command that cannot run as a job before reaching the cluster
            env = runtime_env(args.runtime_env, args.working_dir, dict(_pairs(args.env)))
            if trains_in_driver(command) and not args.entrypoint_num_gpus:
                print(
                    f"warning: {command[0]} trains in the job's driver, which has no GPU without "
                    "--entrypoint-num-gpus 1 (distill can use --workers N --gpus-per-worker 1 instead)",
                    file=sys.stderr,
                )
        server = JobServer(args.address)
        if args.stop:
            stopped = server.stop(job_id)
            print(f"{job_id}: {'stop requested' if stopped else 'already ended'} ({server.info(job_id).status.value})")
            return 0
        if args.status:
            info = server.info(job_id)
            print(f"{job_id}: {info.status.value} {info.message or ''}".rstrip())
            return 0
        if args.logs and not args.follow:
            print(server.logs(job_id), end="")
            return 0
        if not args.logs:
            job_id = server.submit(command, env, args.entrypoint_num_cpus, args.entrypoint_num_gpus, args.submission_id)
            print(job_id)
            print(
                f"follow: cpsc-ray submit --address {server.address} --logs {job_id} --follow\n"
                f"stop:   cpsc-ray submit --address {server.address} --stop {job_id}",
                file=sys.stderr,
            )
        if args.follow:
            server.follow(job_id)
        if not (args.wait or args.follow):
            return 0
        status = server.wait(job_id, args.timeout)
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not status.is_terminal():
        print(f"{job_id}: still {status.value} after {args.timeout:.0f} s; it goes on running", file=sys.stderr)
        return 3
    if status.value != "SUCCEEDED":
        if not args.follow:
            print(
                f"--- last lines of {job_id}'s output ---\n" + "\n".join(server.logs(job_id).splitlines()[-40:]),
                file=sys.stderr,
            )
        print(f"{job_id}: {status.value} ({server.info(job_id).message})", file=sys.stderr)
        return 1
    return 0


def _pairs(items: list[str]) -> list[tuple[str, str]]:
    pairs = [item.partition("=") for item in items]
    bad = [key for key, sep, _ in pairs if not sep or not key]
    if bad:
        raise ConfigError(f"--env {bad[0]}: expected NAME=VALUE, e.g. CPSC_RAY_CACHE=/shared/cache")
    return [(key, value) for key, _, value in pairs]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpsc-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    show = commands.add_parser("config", help="print the resolved config")
    _add_config_args(show)
    show.set_defaults(func=cmd_config)

    teacher = commands.add_parser("teacher", help="train a teacher on real data and save it with its card")
    _add_config_args(teacher)
    teacher.add_argument("--out", help="output directory (default: the cache slot teacher.weights=auto reads)")
    teacher.set_defaults(func=cmd_teacher)

    distill = commands.add_parser("distill", help="distil a student data-free")
    _add_config_args(distill)
    distill.add_argument("--name", help="run name (a new run never overwrites an old one)")
    distill.add_argument("--resume", metavar="NAME", help="continue the run NAME from its last checkpoint")
    distill.add_argument(
        "--storage",
        help="where runs go: a local path, a shared filesystem path or a URI "
        "(s3://, gs://); default: the config's output_dir",
    )
    cluster = distill.add_argument_group("Ray Train (one run over many workers)")
    cluster.add_argument("--workers", type=int, help="run through Ray Train with this many DDP workers")
    cluster.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: CPU, gloo)")
    cluster.add_argument("--cpus-per-worker", type=float, default=1.0)
    cluster.add_argument("--max-failures", type=int, default=0, help="worker-group restarts allowed")
    cluster.add_argument(
        "--inject-fault-at-epoch",
        type=int,
        metavar="EPOCH",
        help="kill one worker once at EPOCH, to rehearse recovery on your cluster",
    )
    distill.set_defaults(func=cmd_distill)

    tuning = commands.add_parser("tune", help="search loss weights, temperature and generator settings with Ray Tune")
    _add_config_args(tuning)
    tuning.add_argument("--space", required=True, help="search space: a YAML path or a name in search_spaces/")
    tuning.add_argument("--scheduler", choices=["fifo", "asha", "pbt", "pb2"], default="fifo")
    tuning.add_argument("--search", choices=["random", "optuna"], default="random")
    tuning.add_argument("--num-samples", type=int, default=8, help="trials (the population size for pbt/pb2)")
    tuning.add_argument(
        "--metric",
        choices=["val_acc", "proxy"],
        help="objective; default val_acc when the config holds a validation split, else proxy",
    )
    tuning.add_argument(
        "--minimize-device-seconds",
        action="store_true",
        help="multi-objective Optuna (NSGA-II): maximise the metric, minimise device seconds",
    )
    tuning.add_argument("--seed-from", metavar="EXPERIMENT", help="start the PBT population from its best configs")
    tuning.add_argument("--workers-per-trial", type=int, default=1, help="DDP workers in each trial (Ray Train)")
    tuning.add_argument(
        "--gpus-per-trial", type=float, default=0.0, help="GPUs of each trial, split across its workers"
    )
    tuning.add_argument("--cpus-per-worker", type=float, default=1.0)
    tuning.add_argument("--max-concurrent", type=int, help="default: as many trials as the cluster holds whole")
    tuning.add_argument("--perturbation-interval", type=int, default=1, help="epochs between PBT decisions")
    tuning.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    tuning.add_argument(
        "--budget-images",
        type=int,
        help="end the experiment once its trials synthesized this many "
        "images in all (compare search methods at equal compute)",
    )
    tuning.add_argument("--keep-checkpoints", type=int, default=3, help="per trial (0 keeps all)")
    tuning.add_argument("--max-failures", type=int, default=0, help="retries of a failed trial")
    tuning.add_argument("--search-seed", type=int, default=0)
    tuning.add_argument("--storage", help="local path, shared filesystem path or URI; default: the config's output_dir")
    tuning.add_argument("--name", help="experiment name (default: <config name>-<method>)")
    tuning.add_argument("--resume", action="store_true", help="continue the interrupted experiment --name")
    tuning.set_defaults(func=cmd_tune)

    final = commands.add_parser("finalize", help="rerun an experiment's selected configuration over seeds, export it")
    final.add_argument("experiment")
    final.add_argument("--seeds", type=int, default=3)
    final.add_argument("--storage", default="runs", help="where the experiment lives (default: runs)")
    final.add_argument("--gpus-per-seed", type=float, default=0.0)
    final.add_argument("--cpus-per-seed", type=float, default=1.0)
    final.set_defaults(func=cmd_finalize)

    report = commands.add_parser("report", help="tables and plots comparing methods and datasets from results")
    report.add_argument(
        "results", nargs="+", metavar="RESULTS", help="storage roots or results/ directories (local paths or URIs)"
    )
    report.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="local directory to write the report to")
    report.add_argument("--experiments", nargs="+", metavar="EXP", help="report only these experiments")
    report.set_defaults(func=cmd_report)

    from cpsc_ray.cluster.submit import DEFAULT_RUNTIME_ENV, DRIVER_CPUS, default_address

    submit = commands.add_parser(
        "submit",
        help="run a cpsc-ray command on a Ray cluster as a job (uploads this checkout)",
        description="cpsc-ray submit [options] -- COMMAND ARGS  |  --logs ID [--follow]  |  --status ID  |  --stop ID. "
        "Exit codes: 0 submitted or succeeded, 1 the job failed or was stopped, 2 bad input or cluster unreachable "
        "or refused, 3 still running at --timeout.",
    )
    submit.add_argument(
        "--address",
        default=default_address(),
        help="the cluster's dashboard URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, or "
        "http://127.0.0.1:8265); authenticates with RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
        "~/.ray/auth_token",
    )
    submit.add_argument("--runtime-env", default=DEFAULT_RUNTIME_ENV, help="runtime env YAML (default: %(default)s)")
    submit.add_argument("--working-dir", help="the checkout to upload (default: the runtime env's, relative to here)")
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="add or override an env var of the job (repeatable)",
    )
    submit.add_argument(
        "--entrypoint-num-cpus", type=float, default=DRIVER_CPUS, help="CPUs the driver reserves (default: %(default)s)"
    )
    submit.add_argument(
        "--entrypoint-num-gpus",
        type=float,
        default=0.0,
        help="GPUs the driver reserves (default: none; trials, seeds and Train workers hold theirs; "
        "teacher and distill without --workers train in the driver and need 1)",
    )
    submit.add_argument("--submission-id", help="job id (default: cpsc-ray-<command>-<time>)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it succeeded")
    submit.add_argument("--timeout", type=float, default=24 * 3600, help="seconds --wait waits (default: a day)")
    submit.add_argument("--follow", action="store_true", help="stream the job's output until it ends")
    existing = submit.add_mutually_exclusive_group()
    existing.add_argument("--logs", metavar="ID", help="print a job's output (with --follow: stream it)")
    existing.add_argument("--status", metavar="ID", help="print a job's status")
    existing.add_argument("--stop", metavar="ID", help="stop a job")
    submit.add_argument("command", nargs=argparse.REMAINDER, help="-- then a cpsc-ray command and its arguments")
    submit.set_defaults(func=cmd_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
