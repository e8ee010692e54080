"""``cpsc-ray teacher`` and ``cpsc-ray distill``: train a teacher, distil a student in this process or
over Ray Train workers, then print the run's summary and write its report."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from cpsc_ray.commands import add_config_args, add_recovery_args, add_run_args, percent, recovery
from cpsc_ray.config import load_config
from cpsc_ray.layout import RootDir, RunDir
from cpsc_ray.storage import Storage

logger = logging.getLogger(__name__)


def add_commands(commands: argparse._SubParsersAction) -> None:
    teacher = commands.add_parser("teacher", help="train a teacher on real data and save it with its card")
    add_config_args(teacher)
    teacher.add_argument("--out", help="output directory (default: the cache slot teacher.weights=auto reads)")
    teacher.add_argument(
        "--if-missing",
        action="store_true",
        help="train only when that slot holds no teacher yet (a job that may run again, such as the grid's)",
    )
    teacher.set_defaults(func=cmd_teacher)

    distill = commands.add_parser("distill", help="distil a student data-free")
    add_config_args(distill)
    add_run_args(distill, "run", "the config's name")
    cluster = distill.add_argument_group("Ray Train (one run over many workers)")
    cluster.add_argument(
        "--workers", type=int, help="run through Ray Train with this many DDP workers (default: in this process)"
    )
    cluster.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: CPU, gloo)")
    cluster.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker")
    add_recovery_args(cluster, "worker-group restarts after a worker fails (--max-failures: its older name)")
    cluster.add_argument("--max-failures", type=int, dest="max_restarts", help=argparse.SUPPRESS)
    cluster.add_argument(
        "--inject-fault-at-epoch",
        type=int,
        metavar="EPOCH",
        help="make one worker fail once at EPOCH (see --inject-fault), to rehearse recovery on your cluster",
    )
    cluster.add_argument(
        "--inject-fault",
        choices=["crash", "hang"],
        default="crash",
        help="crash: the worker's process dies; hang: it stops answering, and --collective-timeout ends the wait",
    )
    distill.set_defaults(func=cmd_distill)


def cmd_teacher(args: argparse.Namespace) -> int:
    from cpsc_ray.runs.teacher import card_path, teacher_path, train_teacher

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else None
    if args.if_missing and teacher_path(cfg, out).is_file():
        print(f"teacher already trained: {teacher_path(cfg, out)} (--if-missing)")
        return 0
    path = train_teacher(cfg, out=out)
    print(f"teacher written to {path}\n{card_path(path).read_text()}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    name = args.name or args.resume_or_start
    cfg = load_config(args.config, list(args.overrides) + ([f"name={name}"] if name else []))
    resume = args.resume or existing_run(args.resume_or_start, args.storage or cfg.output_dir)
    or_start = bool(args.resume_or_start)
    if args.workers:
        from cpsc_ray.cluster.recovery import Fault
        from cpsc_ray.cluster.train import run_distributed

        fault = Fault(args.inject_fault_at_epoch, args.inject_fault) if args.inject_fault_at_epoch else None
        summary = run_distributed(
            cfg,
            args.workers,
            args.gpus_per_worker,
            args.cpus_per_worker,
            args.storage,
            recovery(args),
            resume,
            fault,
            args.autoscaling,
            or_start,
        )
    else:
        from cpsc_ray.runs.in_process import run_in_process

        if args.storage:
            cfg = cfg.model_copy(update={"output_dir": args.storage})
        summary = run_in_process(cfg, resume=resume, or_start=or_start)
    print_summary(summary)
    report_run(summary)
    return 0


def existing_run(name: str | None, storage: str) -> str | None:
    """``name`` when a run of that name is under ``storage`` (--resume-or-start continues it), else None."""
    return name if name and RootDir(storage).exists(name) else None


def print_summary(summary: dict) -> None:
    best, last = summary.get("best") or {}, summary["last"]
    chosen = summary["selected_by"]
    print(
        f"\nrun {summary['run']}: {summary['epochs']} epochs, {summary['images']:,} synthetic images, "
        f"{summary['device_s']:.0f} device-seconds"
    )
    print(f"  teacher test accuracy:        {percent(summary['teacher_test_acc'])}")
    print(f"  student test accuracy (last): {percent(last.get('test_acc'))}")
    if chosen.get("metric"):
        selected = f"best by {chosen['metric']}, epoch {chosen['epoch']}"
        print(f"  student test accuracy ({selected}): {percent(best.get('test_acc'))}")
    for warning in summary.get("warnings", []):
        logger.warning(warning)
    print(f"  outputs: {summary['run_dir']}")


def report_run(summary: dict) -> None:
    """The report of the run just finished, in its run directory when that is local."""
    from cpsc_ray.results.report import build_report
    from cpsc_ray.results.tables import ResultsError

    run_dir = summary["run_dir"]
    parent, _ = Storage.of_file(run_dir)
    storage = parent.uri()
    if "://" in run_dir:
        print(f"  report: cpsc-ray report {shlex.quote(storage)} --experiments {summary['run']} -o REPORT_DIR")
        return
    try:
        page = build_report([storage], Path(run_dir) / RunDir.REPORT, [summary["run"]])
    except ResultsError as err:
        logger.warning("no report for this run: %s", err)
        return
    print(f"  report: {page}")
    print(f"  compare every run there: cpsc-ray report {storage} -o {storage}/report")
