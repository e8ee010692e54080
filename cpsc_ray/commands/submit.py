"""``cpsc-ray submit``: run a cpsc-ray command on a Ray cluster as a job, and follow, inspect or stop jobs."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from cpsc_ray.errors import InputError

if TYPE_CHECKING:
    from ray.job_submission import JobStatus

    from cpsc_ray.cluster.submit import JobServer

logger = logging.getLogger(__name__)


def add_commands(commands: argparse._SubParsersAction) -> None:
    from cpsc_ray.cluster.submit import DEFAULT_RUNTIME_ENV, DRIVER_CPUS, RECONNECT_S, default_address

    submit = commands.add_parser(
        "submit",
        help="run a cpsc-ray command on a Ray cluster as a job (uploads this checkout)",
        description="cpsc-ray submit [options] -- COMMAND ARGS  |  --logs ID [--follow]  |  --status ID  |  --stop ID. "
        "Exit codes: 0 submitted or succeeded, 1 the job failed or was stopped, 2 bad input or cluster unreachable "
        "or refused, 3 still running at --timeout, 4 --wait lost the cluster for longer than --reconnect-timeout "
        "(or it forgot the job): the job's outcome is unknown.",
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
    submit.add_argument(
        "--driver-resource",
        metavar="NAME",
        help="run the job's driver on a node that carries this custom resource (the head or an on-demand node), "
        "not where its CPUs happen to be free: a preempted spot node would end the whole job",
    )
    submit.add_argument("--submission-id", help="job id (default: cpsc-ray-<command>-<time>)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it succeeded")
    submit.add_argument("--timeout", type=float, default=24 * 3600, help="seconds --wait waits (default: a day)")
    submit.add_argument(
        "--reconnect-timeout",
        type=float,
        default=RECONNECT_S,
        metavar="SECONDS",
        help="how long --wait retries a dropped connection (a head restarting) before it gives up (exit code 4)",
    )
    submit.add_argument("--follow", action="store_true", help="stream the job's output until it ends")
    existing = submit.add_mutually_exclusive_group()
    existing.add_argument("--logs", metavar="ID", help="print a job's output (with --follow: stream it)")
    existing.add_argument("--status", metavar="ID", help="print a job's status")
    existing.add_argument("--stop", metavar="ID", help="stop a job")
    submit.add_argument("command", nargs=argparse.REMAINDER, help="-- then a cpsc-ray command and its arguments")
    submit.set_defaults(func=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    from cpsc_ray.cluster.submit import Driver, JobServer

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    job_id = args.logs or args.stop or args.status
    env = None if job_id else _job_env(command, args)  # refuse a job that cannot run before reaching the cluster
    server = JobServer(args.address)
    if args.stop or args.status or (args.logs and not args.follow):
        _show_job(server, args)
        return 0
    if not job_id:
        driver = Driver(args.entrypoint_num_cpus, args.entrypoint_num_gpus, args.driver_resource)
        job_id = server.submit(command, env, driver, args.submission_id)
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
    status = server.wait(job_id, args.timeout, report=sys.stderr, reconnect_s=args.reconnect_timeout)
    return _exit_code(server, job_id, status, args)


def _job_env(command: list[str], args: argparse.Namespace) -> dict:
    """The job's runtime env; raises on a command that cannot run as a job."""
    from cpsc_ray.cluster.submit import entrypoint, runtime_env, trains_in_driver

    entrypoint(command)
    env = runtime_env(args.runtime_env, args.working_dir, dict(_pairs(args.env)))
    if trains_in_driver(command) and not args.entrypoint_num_gpus:
        logger.warning(
            "%s trains in the job's driver, which has no GPU without --entrypoint-num-gpus 1 (distill can use "
            "--workers N --gpus-per-worker 1 instead)",
            command[0],
        )
    return env


def _show_job(server: JobServer, args: argparse.Namespace) -> None:
    """--stop, --status or --logs without --follow."""
    if args.stop:
        stopped = server.stop(args.stop)
        print(
            f"{args.stop}: {'stop requested' if stopped else 'already ended'} ({server.info(args.stop).status.value})"
        )
    elif args.status:
        info = server.info(args.status)
        print(f"{args.status}: {info.status.value} {info.message or ''}".rstrip())
    else:
        print(server.logs(args.logs), end="")


def _exit_code(server: JobServer, job_id: str, status: JobStatus, args: argparse.Namespace) -> int:
    """0 succeeded, 3 still running; a job that failed or was stopped raises ``JobFailed`` (exit 1), after the end
    of its output unless it was followed."""
    from cpsc_ray.cluster.submit import JobFailed

    if not status.is_terminal():
        print(f"{job_id}: still {status.value} after {args.timeout:.0f} s; it goes on running", file=sys.stderr)
        return 3
    if status.value != "SUCCEEDED":
        if not args.follow:
            print(
                f"--- last lines of {job_id}'s output ---\n" + "\n".join(server.logs(job_id).splitlines()[-40:]),
                file=sys.stderr,
            )
        raise JobFailed(f"{job_id}: {status.value} ({server.info(job_id).message})")
    return 0


def _pairs(items: list[str]) -> list[tuple[str, str]]:
    pairs = [item.partition("=") for item in items]
    bad = [key for key, sep, _ in pairs if not sep or not key]
    if bad:
        raise InputError(f"--env {bad[0]}: expected NAME=VALUE, e.g. CPSC_RAY_CACHE=/shared/cache")
    return [(key, value) for key, _, value in pairs]
