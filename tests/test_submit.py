"""``cpsc-ray submit`` against a real local Ray head of its own (tests/ray_nodes.py).

The job uploads a copy of the checkout holding a config and a search space that exist only in the
copy, so it can succeed only by running the uploaded code."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY
from ray_nodes import REPO, Head, Proxy, copy_of_the_code, free_ports, running_head

from cpsc_ray.cluster.submit import JobServer
from cpsc_ray.results.report import build_report
from cpsc_ray.results.tables import read_results

JOB_TIMEOUT_S = 480
SPACE = """params:
  loss.alpha: {distribution: loguniform, low: 0.5, high: 5.0}
  loss.gamma: {distribution: loguniform, low: 0.1, high: 2.0}
  student.lr: {distribution: loguniform, low: 0.005, high: 0.03}
"""


@pytest.fixture(scope="module")
def ray_head():
    with running_head(num_cpus=2) as head:
        yield head


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the repository's code with a config and a search space only the copy holds."""
    root = copy_of_the_code(tmp_path_factory.mktemp("checkout"))
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
    """... and ``--wait`` rides out 20 s without a connection to the job server (a proxy between them drops)."""
    storage = tmp_path / "runs"
    job_id = f"cpsc-ray-test-{uuid.uuid4().hex[:8]}"
    proxy = Proxy(int(ray_head.url.rpartition(":")[2]))
    # fmt: off
    command = [
        "--submission-id", job_id, "--env", f"CPSC_RAY_CACHE={session_cache}",
        "--wait", "--timeout", str(JOB_TIMEOUT_S),
        "--", "tune", "--config", "submitted_digits", "--space", "submitted_calm", "--num-samples", "2",
        "--storage", str(storage), "--name", "submitted", *TINY,
    ]
    # fmt: on
    waiting = subprocess.Popen(
        [sys.executable, "-m", "cpsc_ray", "submit", "--address", proxy.url, *command],
        cwd=checkout,
        env={**ray_head.env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiting.stdout.readline().strip() == job_id  # submitted; now waiting
        proxy.drop(20)
        _, err = waiting.communicate(timeout=JOB_TIMEOUT_S + 60)
    finally:
        waiting.kill()
        proxy.close()
    assert waiting.returncode == 0, f"{err}\n--- job logs ---\n{job_logs(ray_head, checkout, job_id)}"
    assert err.count("lost contact with") == 1, err

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
    spent = (results.epochs.epoch_s * results.epochs.workers + results.epochs.overhead_s).sum()  # set-up included
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
