"""A tuning job outlives its head: a PBT experiment of two trials on a head and a worker node (tests/ray_nodes.py),
submitted as a job with ``--resume-or-start``; mid-run the head's whole process session (the job's driver with it)
is killed, as a lost head pod or machine would be, and the worker node goes with its cluster. A new head and
worker node on the same storage get the same command again, as KubeRay's retry of the RayJob or a rerun of the
grid would submit it: the experiment continues under its one name, every (trial, epoch) trained once."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from conftest import TINY
from ray_nodes import copy_of_the_code, kill_node, running_head, start_worker_node, stop_node

from cpsc_ray.cluster.submit import Driver, JobServer, runtime_env
from cpsc_ray.results.tables import read_results
from cpsc_ray.storage import Storage

EPOCHS = 4
JOB_TIMEOUT_S = 300


def epochs_per_trial(experiment: Path) -> dict[str, list[int]]:
    trials = Storage(str(experiment / "cpsc/trials"))
    return {
        trial: [r["epoch"] for r in trials.read_parquet(f"{trial}/metrics.parquet").to_pylist()]
        for trial in trials.list_dirs()
        if trials.exists(f"{trial}/metrics.parquet")
    }


def submit_the_tuning_job(head, code: Path, storage: Path, cache: Path) -> tuple[JobServer, str]:
    server = JobServer(head.url, token=head.token)
    command = [
        *("tune", "--config", "digits", "--space", "digits_pbt", "--scheduler", "pbt", "--num-samples", "2"),
        *("--resume-or-start", "restarted", "--storage", str(storage), *TINY, f"train.epochs={EPOCHS}"),
    ]
    # Tune saves the experiment's state at every step here (by default: every 10 s or more).
    env = runtime_env(code / "launch/runtime_env.yaml", str(code), {"CPSC_RAY_CACHE": str(cache)})
    env["env_vars"]["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
    job_id = f"cpsc-ray-restart-{uuid.uuid4().hex[:8]}"
    return server, server.submit(command, env, Driver(cpus=0), job_id)


@pytest.mark.timeout(2 * JOB_TIMEOUT_S + 240)
def test_a_resubmitted_tuning_job_continues_its_experiment_after_its_head_was_lost(digits_cfg, session_cache, tmp_path):
    code = copy_of_the_code(tmp_path / "code")
    storage = tmp_path / "runs"
    experiment = storage / "restarted"

    with running_head(num_cpus=1) as head:
        worker, _ = start_worker_node(head, num_cpus=1)
        try:
            server, job_id = submit_the_tuning_job(head, code, storage, session_cache)
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while len(before := epochs_per_trial(experiment)) < 2 or min(map(len, before.values())) < 1:
                assert not server.client.get_job_status(job_id).is_terminal(), server.logs(job_id)
                assert time.monotonic() < deadline, f"no epoch in {JOB_TIMEOUT_S} s:\n{server.logs(job_id)}"
                time.sleep(0.2)
            kill_node(head.node)
        finally:
            kill_node(worker)  # it goes with its cluster (a stop would wait a minute for the lost head)
            stop_node(worker)  # its temp dir
    assert max(map(len, before.values())) < EPOCHS, "the experiment ended before its head was lost: make it longer"

    with running_head(num_cpus=1) as head:
        worker, _ = start_worker_node(head, num_cpus=1)
        try:
            server, job_id = submit_the_tuning_job(head, code, storage, session_cache)
            status = server.wait(job_id, timeout=JOB_TIMEOUT_S, report=None)
            logs = server.logs(job_id)
        finally:
            stop_node(worker)
    assert status.value == "SUCCEEDED", logs

    assert sorted(p.name for p in storage.iterdir()) == ["restarted", "results"], "one name, no suffixed copy"
    after = epochs_per_trial(experiment)
    assert set(after) == set(before), "the same two trials went on"
    assert all(epochs == list(range(1, EPOCHS + 1)) for epochs in after.values()), after
    results = read_results([str(storage)], experiments=["restarted"])
    assert sorted(results.epochs.groupby("trial_id").epoch.apply(sorted).sum()) == sorted(2 * list(range(1, 5)))
    assert set(results.trials.trial_id) == set(before)
