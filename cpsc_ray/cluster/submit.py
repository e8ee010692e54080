"""``cpsc-ray submit``: run a cpsc-ray command on a Ray cluster as a Ray job, from a checkout.

The job uploads the working directory (this checkout, less what the runtime env excludes) and runs
``python -m cpsc_ray <command> ...`` inside it, so the cluster runs this code, not whatever cpsc-ray
the head has installed. The driver asks for a fraction of a CPU and no GPU: trials, seeds and Train
workers hold the GPUs. Only commands that train in the driver itself (``teacher``, ``distill``
without ``--workers``) need ``--entrypoint-num-gpus 1``.

``ray start`` turns token authentication on in this Ray version. The client sends the cluster's
token as a bearer header, taken from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``
names, else ``~/.ray/auth_token`` (``ray get-auth-token`` on the head prints it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from cpsc_ray.cluster.recovery import DRIVER_RESOURCE_SHARE
from cpsc_ray.credentials import refuse_credentials, refuse_secret_variables
from cpsc_ray.errors import CommandError, InputError, RunFailed

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobStatus

COMMANDS = ("teacher", "distill", "tune", "finalize", "report")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_RUNTIME_ENV = "launch/runtime_env.yaml"
DRIVER_CPUS = 0.1  # the driver only orchestrates; a whole CPU could keep a trial off a node
POLL_S = 2.0
RECONNECT_S = 600.0  # how long --wait retries a dropped connection: a head's restart, a port-forward's reconnect
# Options and config keys that name paths: a job runs in a temporary copy of the working dir, so a
# relative path would write into that copy (and be lost) or read from it.
PATH_OPTIONS = ("--storage", "--out", "-o")
PATH_KEYS = ("output_dir", "data.root", "teacher.weights")
STORING = ("distill", "tune", "finalize")


@dataclass(frozen=True)
class Driver:
    """What a job's driver reserves, and the custom resource of the nodes it may run on (None: any node that has
    the CPUs and GPUs free; Ray places a job that reserves nothing on the head)."""

    cpus: float = DRIVER_CPUS
    gpus: float = 0.0
    resource: str | None = None


class SubmitError(InputError):
    """A job that cannot be submitted or reached; the message names the cause and the fix."""


class JobFailed(RunFailed):
    """A submitted job that ended other than SUCCEEDED."""


class JobUnknown(CommandError):
    """A job whose outcome cannot be learnt: its cluster stayed unreachable past the reconnect bound, or no longer
    knows it (a head that restarted without GCS fault tolerance). The job may still be running."""

    exit_code = 4


def transient(error: BaseException) -> bool:
    """An error of the connection to the job server that a later request may not meet: the server unreachable
    (requests' connection errors and timeouts are OSErrors), or a proxy or a restarting head answering 5xx."""
    if isinstance(error, OSError):
        return True
    return isinstance(error, RuntimeError) and re.search(r"status code 5\d\d", str(error)) is not None


def default_address() -> str:
    """Where Ray's job CLI looks; a RAY_ADDRESS that is a GCS address (host:6379) names no job server."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    return os.environ.get("RAY_API_SERVER_ADDRESS") or (ray_address if "://" in ray_address else DEFAULT_ADDRESS)


def auth_token() -> str | None:
    """The token this client sends, found where Ray's own clients look for it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def trains_in_driver(command: list[str]) -> bool:
    return command[0] == "teacher" or (
        command[0] == "distill" and not any(arg.partition("=")[0] == "--workers" for arg in command)
    )


def entrypoint(command: list[str]) -> str:
    """The job's shell command for a cpsc-ray command line, after checking that it can run as a job."""
    if not command or command[0] not in COMMANDS:
        given = command[0] if command else "nothing"
        raise SubmitError(
            f"cannot submit {given!r}: give a cpsc-ray command after --, one of {', '.join(COMMANDS)} "
            "(e.g. cpsc-ray submit -- tune --config digits --space digits_optuna --storage /shared/runs)"
        )
    paths: dict[str, str] = {}
    for i, arg in enumerate(command):
        option, sep, value = arg.partition("=")
        if option in PATH_OPTIONS:
            if not sep and i + 1 < len(command):
                value = command[i + 1]
            paths[option] = value
        elif sep and option in PATH_KEYS and value != "auto":
            paths[option] = value
    for arg in command:  # the entrypoint is shown by `ray job list`: no location in it may carry a credential
        value = arg.partition("=")[2] if "=" in arg.partition("://")[0] else arg
        if "://" in value:
            refuse_credentials(value, arg.partition("=")[0] if value != arg else "location")
    for name, value in paths.items():
        if "://" not in value and not os.path.isabs(value):
            raise SubmitError(
                f"{name} {value}: a job runs in a temporary copy of the working directory, so give an absolute "
                "path on storage every node mounts, or a URI (s3://, gs://)"
            )
    if command[0] in STORING and "--storage" not in paths and "output_dir" not in paths:
        raise SubmitError(
            f"{command[0]} as a job needs --storage: an absolute path on shared storage or a URI, where its runs "
            "and results outlive the job's temporary working directory"
        )
    # exec: the job's shell becomes the driver, so the process Ray signals on --stop is the driver
    # itself; a shell that forked it could die first and leave the driver running on the head.
    return "exec " + shlex.join(["python", "-m", "cpsc_ray", *command])


def runtime_env(path: str | Path, working_dir: str | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The runtime env of ``path`` with its working_dir (or ``working_dir``) made absolute, checked to
    be a cpsc-ray checkout, and ``env`` added to its env_vars."""
    path = Path(path)
    if not path.is_file():
        raise SubmitError(
            f"runtime env {path}: no such file; run from the repository root (it holds {DEFAULT_RUNTIME_ENV}) or "
            "give --runtime-env PATH"
        )
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise SubmitError(f"runtime env {path}: expected a mapping (working_dir, env_vars, ...)")
    root = Path(working_dir or spec.get("working_dir") or ".").expanduser().resolve()
    if not (root / "cpsc_ray" / "__init__.py").is_file():
        raise SubmitError(
            f"working dir {root}: not a cpsc-ray checkout (no cpsc_ray/ package there); run from the repository "
            "root or give --working-dir PATH"
        )
    spec["working_dir"] = str(root)
    spec["env_vars"] = {k: str(v) for k, v in {**(spec.get("env_vars") or {}), **(env or {})}.items()}
    refuse_secret_variables(list(spec["env_vars"]), "job variable")
    return spec


def submission_id(command: str) -> str:
    return f"cpsc-ray-{command}-{dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


def http_address(address: str) -> str:
    return address if "://" in address else f"http://{address}"


class JobServer:
    """A cluster's job server (the dashboard address); its failures become one-line SubmitErrors."""

    def __init__(self, address: str, token: str | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = http_address(address)
        self.token = token if token is not None else auth_token()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        with self._reaching():
            self.client = JobSubmissionClient(self.address, headers=headers)

    @contextmanager
    def _reaching(self, job_id: str | None = None) -> Iterator[None]:
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError:
            sent = "the token sent was refused" if self.token else "no token was sent"
            raise SubmitError(
                f"{self.address}: authentication failed ({sent}); set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a "
                "file, holding the cluster's token (`ray get-auth-token` on the head prints it)"
            ) from None
        except ConnectionError:
            raise SubmitError(
                f"{self.address}: no Ray job server answers there; give --address http://HEAD:8265 (the dashboard "
                "port; `ray dashboard launch/cluster.yaml` forwards it to localhost)"
            ) from None
        except RuntimeError as err:
            reason = (str(err).splitlines() or ["request failed"])[0]
            where = f"job {job_id}" if job_id else self.address
            raise SubmitError(f"{where}: {reason}") from None

    def submit(self, command: list[str], env: dict[str, Any], driver: Driver, job_id: str | None = None) -> str:
        with self._reaching():
            return self.client.submit_job(
                entrypoint=entrypoint(command),
                runtime_env=env,
                submission_id=job_id or submission_id(command[0]),
                entrypoint_num_cpus=driver.cpus,
                entrypoint_num_gpus=driver.gpus or None,
                entrypoint_resources={driver.resource: DRIVER_RESOURCE_SHARE} if driver.resource else None,
            )

    def info(self, job_id: str) -> JobDetails:
        with self._reaching(job_id):
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        with self._reaching(job_id):
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, out: TextIO = sys.stdout) -> None:
        """Stream the job's output until it ends."""
        import aiohttp

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        try:
            with self._reaching(job_id):
                asyncio.run(tail())
        except aiohttp.ClientError as err:
            raise SubmitError(
                f"job {job_id}: cannot stream its logs ({err}); try --logs {job_id} without --follow"
            ) from None

    def stop(self, job_id: str) -> bool:
        with self._reaching(job_id):
            return self.client.stop_job(job_id)

    def wait(
        self, job_id: str, timeout: float, report: TextIO | None = sys.stderr, reconnect_s: float = RECONNECT_S
    ) -> JobStatus:
        """Poll until the job ends or ``timeout`` seconds pass; returns the last status seen. A dropped connection
        is retried with backoff for up to ``reconnect_s`` seconds, said once on ``report``; past that, or when
        the cluster no longer knows the job, raises JobUnknown."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            status = self._status_riding_out_drops(job_id, reconnect_s, report)
            if status != last and report is not None:
                print(f"{job_id}: {status.value}", file=report)
            last = status
            if status.is_terminal() or time.monotonic() >= deadline:
                return status
            time.sleep(POLL_S)

    def _status_riding_out_drops(self, job_id: str, reconnect_s: float, report: TextIO | None) -> JobStatus:
        import tenacity

        def say_once(attempt: tenacity.RetryCallState) -> None:
            if attempt.attempt_number == 1 and report is not None:
                reason = str(attempt.outcome.exception()).splitlines()[0][:200]
                print(
                    f"{job_id}: lost contact with {self.address} ({reason}); retrying for up to {reconnect_s:g} s "
                    f"(--reconnect-timeout)",
                    file=report,
                )

        try:
            for attempt in tenacity.Retrying(
                retry=tenacity.retry_if_exception(transient),
                wait=tenacity.wait_exponential(multiplier=1, max=30),
                stop=tenacity.stop_after_delay(reconnect_s),
                before_sleep=say_once,
                reraise=True,
            ):
                with attempt:
                    return self.client.get_job_status(job_id)
        except Exception as err:  # noqa: BLE001 - what the retries ended on decides the message
            if transient(err):
                raise JobUnknown(
                    f"{self.address}: no answer for {reconnect_s:g} s while waiting for {job_id}, which may still be "
                    f"running: check it with --status {job_id} once the cluster answers"
                ) from None
            if "does not exist" in str(err):
                raise JobUnknown(
                    f"job {job_id}: the cluster no longer knows it (its head restarted without GCS fault tolerance, "
                    f"launch/rayjob.yaml); resubmit the command with --resume-or-start to continue its run"
                ) from None
            with self._reaching(job_id):
                raise
