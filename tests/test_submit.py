"""``cpsc-ray submit`` against a real local Ray head: its own temp dir, free ports and auth token, so
it neither joins nor disturbs the session's ``ray_local`` instance or other Ray clusters on the
machine. The head runs as ``ray start --block`` in its own process session and is stopped by
signalling that session only (``ray stop`` would stop every Ray process on the machine).

The job uploads a copy of the checkout holding a config and a search space that exist only in the
copy, so it can succeed only by running the uploaded code."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY

from cpsc_ray.cluster.submit import JobServer
from cpsc_ray.results.report import build_report
from cpsc_ray.results.store import read_results

REPO = Path(__file__).resolve().parents[1]
HEAD_START_S = 120
JOB_TIMEOUT_S = 480
SPACE = """params:
  loss.alpha: {distribution: loguniform, low: 0.5, high: 5.0}
  loss.gamma: {distribution: loguniform, low: 0.1, high: 2.0}
  student.lr: {distribution: loguniform, low: 0.005, high: 0.03}
"""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_window(size: int) -> int:
    """The first port of ``size`` consecutive free ports, for the head's workers."""
    for first in range(20000, 30000, size):
        try:
            for port in range(first, first + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no window of free ports for Ray's workers")


def session_members(session: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    members.append(int(entry))
            except OSError:
                pass
    return members


@dataclass
class Head:
    url: str
    token: str
    gcs_port: int
    env: dict[str, str]  # for clients: the token, this venv's tools, no RAY_ADDRESS


def working_in(directory: Path) -> list[int]:
    """Processes whose working directory is under ``directory``: a job's driver runs in its unpacked
    working dir below the head's temp dir, in a process session of its own."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(os.readlink(f"/proc/{entry}/cwd")).is_relative_to(directory):
                    members.append(int(entry))
            except OSError:
                pass
    return members


def _stop(proc: subprocess.Popen, temp: Path) -> list[int]:
    """Stop the head: ``ray start --block`` tears its processes down on SIGTERM; whatever remains in
    its session, or still works in its temp dir (a job driver that outlived its job), is killed.
    Returns what had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    remaining = lambda: sorted(set(session_members(proc.pid)) | set(working_in(temp)))  # noqa: E731
    deadline = time.monotonic() + 20
    while remaining() and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = remaining()
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers


@pytest.fixture(scope="module")
def ray_head():
    gcs, dashboard, client, agent, agent_grpc, runtime_env_agent, metrics, node_manager, objects = free_ports(9)
    workers = free_port_window(100)
    temp = Path(tempfile.mkdtemp(prefix="cpsc-ray-head-"))  # short: Ray's socket paths live under it
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={objects}",
        f"--min-worker-port={workers}",
        f"--max-worker-port={workers + 99}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    log = temp / "head.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + HEAD_START_S
        while True:
            assert proc.poll() is None, f"ray start exited ({proc.returncode}):\n{log.read_text()}"
            try:
                request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(request, timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, f"head not up after {HEAD_START_S} s:\n{log.read_text()}"
                time.sleep(1)
        yield Head(url, token, gcs, env)
    finally:
        leftovers = _stop(proc, temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert not leftovers, f"processes of the head outlived it: {leftovers}"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the repository's code with a config and a search space only the copy holds."""
    root = tmp_path_factory.mktemp("checkout")
    for name in ("cpsc_ray", "search_spaces", "launch"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root)
    shutil.copy(REPO / "cpsc_ray/configs/digits.yaml", root / "cpsc_ray/configs/submitted_digits.yaml")
    (root / "search_spaces/submitted_calm.yaml").write_text(SPACE)
    return root


def running_with(argument: str) -> list[int]:
    """Processes with ``argument`` on their command line."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if argument in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0"):
                    found.append(int(entry))
            except OSError:
                pass
    return found


def submit(head: Head, checkout: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "cpsc_ray", "submit", "--address", head.url, *args],
        cwd=checkout,
        env={**head.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_logs(head: Head, checkout: Path, job_id: str) -> str:
    result = submit(head, checkout, "--logs", job_id)
    return result.stdout + result.stderr


def test_a_submitted_tuning_job_runs_the_uploaded_code(ray_head, checkout, digits_cfg, session_cache, tmp_path):
    storage = tmp_path / "runs"
    job_id = f"cpsc-ray-test-{uuid.uuid4().hex[:8]}"
    result = submit(
        ray_head,
        checkout,
        "--submission-id",
        job_id,
        "--env",
        f"CPSC_RAY_CACHE={session_cache}",
        "--wait",
        "--timeout",
        str(JOB_TIMEOUT_S),
        "--",
        "tune",
        "--config",
        "submitted_digits",
        "--space",
        "submitted_calm",
        "--num-samples",
        "2",
        "--storage",
        str(storage),
        "--name",
        "submitted",
        *TINY,
        timeout=JOB_TIMEOUT_S + 60,
    )
    assert result.returncode == 0, f"{result.stderr}\n--- job logs ---\n{job_logs(ray_head, checkout, job_id)}"
    assert result.stdout.splitlines()[0] == job_id

    info = JobServer(ray_head.url, token=ray_head.token).info(job_id)
    assert info.entrypoint.startswith("exec python -m cpsc_ray tune --config submitted_digits")
    assert info.runtime_env["working_dir"].startswith("gcs://")  # the uploaded package, not a path on the head
    assert info.runtime_env["env_vars"]["CPSC_RAY_CACHE"] == str(session_cache)
    # The head has no GPU: a driver that asked for one would have stayed PENDING, never succeeded.
    assert "experiment submitted: 2 trials" in job_logs(ray_head, checkout, job_id)

    results = read_results([str(storage)])
    trials = results.trials
    assert set(trials.experiment) == {"submitted"} and set(trials.kind) == {"tune"} and len(trials) == 2
    assert set(trials.method) == {"random+fifo"} and set(trials.dataset) == {"digits"}
    assert trials.images.sum() == results.epochs.epoch_images.sum() > 0

    page = build_report([str(storage)], tmp_path / "report")
    summary = pd.read_parquet(tmp_path / "report/summary.parquet")
    row = summary[summary.experiment == "submitted"].iloc[0]
    assert row.trials == 2 and row.runs == 2 and row.n == 1 and row.single_run
    spent = (results.epochs.epoch_s * results.epochs.workers).sum()
    assert abs(row.device_s - spent) < 1e-6
    assert "submitted" in page.read_text() and "data:image/png;base64," in page.read_text()


def test_jobs_are_stopped_failures_reported_and_wrong_tokens_refused(
    ray_head, checkout, digits_cfg, session_cache, tmp_path
):
    server = JobServer(ray_head.url, token=ray_head.token)
    long_run = submit(
        ray_head,
        checkout,
        "--env",
        f"CPSC_RAY_CACHE={session_cache}",
        "--",
        "distill",
        "--config",
        "submitted_digits",
        "--storage",
        str(tmp_path / "runs"),
        *TINY,
        "train.epochs=100000",
    )
    assert long_run.returncode == 0, long_run.stderr
    job_id = long_run.stdout.strip()
    # Stop it once it trains: the driver itself must end, not only the job's status.
    deadline = time.monotonic() + 120
    while not re.search(r"\d+/100000 \[", server.logs(job_id)):
        assert time.monotonic() < deadline, f"the job never started training:\n{server.logs(job_id)}"
        time.sleep(1)
    stopped = submit(ray_head, checkout, "--stop", job_id)
    assert stopped.returncode == 0 and job_id in stopped.stdout, stopped.stderr
    assert server.wait(job_id, timeout=90, report=None).value == "STOPPED"
    drivers = lambda: running_with(str(tmp_path / "runs"))  # noqa: E731
    deadline = time.monotonic() + 30
    while drivers() and time.monotonic() < deadline:
        time.sleep(1)
    assert not drivers(), "the stopped job's driver is still running"

    failing = submit(
        ray_head,
        checkout,
        "--wait",
        "--timeout",
        "180",
        "--",
        "finalize",
        "no-such-experiment",
        "--storage",
        str(tmp_path / "runs"),
        timeout=240,
    )
    assert failing.returncode == 1, failing.stderr
    assert "FAILED" in failing.stderr and "no tuning experiment of that name" in failing.stderr  # the job's own error

    refused = submit(ray_head, checkout, "--status", job_id, env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert refused.returncode == 2
    assert "authentication failed" in refused.stderr and "RAY_AUTH_TOKEN" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    unreachable = submit(ray_head, checkout, "--address", f"http://127.0.0.1:{free_ports(1)[0]}", "--status", job_id)
    assert unreachable.returncode == 2 and "no Ray job server answers" in unreachable.stderr


def test_the_head_leaves_nothing_for_a_later_ray_init_to_join(ray_head):
    assert "RAY_ADDRESS" not in os.environ
    current = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    assert not current.exists() or f":{ray_head.gcs_port}" not in current.read_text()
