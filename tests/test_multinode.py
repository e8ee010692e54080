"""A distillation run over two Ray nodes survives losing one: a head and a worker node on this machine
(tests/ray_nodes.py), one CPU each, so the run's two Train workers (one CPU each) are placed one per node.
The job goes in through plain ``ray job submit``; the worker node is killed whole mid-run and started
again, and the run must finish with every epoch once and loadable checkpoints."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import TINY
from ray_nodes import RAY, ask, copy_of_the_code, kill_node, listed, running_head, start_worker_node, stop_node

from cpsc_ray.cluster.submit import JobServer
from cpsc_ray.layout import RunDir
from cpsc_ray.runs.checkpoints import newest_checkpoint, read_checkpoint

EPOCHS = 6
LOST_AFTER_EPOCH = 3  # Ray Train takes in reports every 2 s: by then epoch 1's checkpoint is surely in
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def ray_head():
    with running_head(num_cpus=1) as head:
        yield head


def rows_written(run: Path) -> list[dict]:
    """The run's rows so far, read as reports read them: the run replaces the file every epoch."""
    outputs = RunDir(str(run))
    return outputs.read_parquet("metrics.parquet").to_pylist() if outputs.exists("metrics.parquet") else []


@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
def test_a_run_over_two_nodes_survives_losing_one(ray_head, digits_cfg, session_cache, tmp_path):
    code = copy_of_the_code(tmp_path / "code")
    run = tmp_path / "runs/lost"
    server = JobServer(ray_head.url, token=ray_head.token)
    job_id = f"cpsc-ray-multinode-{uuid.uuid4().hex[:8]}"
    env_vars = {
        "CPSC_RAY_CACHE": str(session_cache),  # the session's teacher
        "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",  # the dashboard's record of Train runs and their attempts
    }
    worker_nodes = []
    try:
        first, first_id = start_worker_node(ray_head, num_cpus=1)
        worker_nodes.append(first)
        submitted = subprocess.run(
            [
                *(RAY, "job", "submit", "--address", ray_head.url, "--submission-id", job_id, "--no-wait"),
                *("--working-dir", str(code), "--entrypoint-num-cpus", "0"),
                *("--runtime-env-json", json.dumps({"env_vars": env_vars})),
                *("--", "python", "-m", "cpsc_ray", "distill", "--name", "lost", "--workers", "2"),
                *("--max-failures", "2", "--storage", str(run.parent), *TINY),
                *(f"train.epochs={EPOCHS}", "train.checkpoint_every=1"),
            ],
            env=ray_head.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert submitted.returncode == 0, submitted.stderr

        deadline = time.monotonic() + JOB_TIMEOUT_S
        while len(before_loss := rows_written(run)) < LOST_AFTER_EPOCH:
            assert not server.client.get_job_status(job_id).is_terminal(), server.logs(job_id)
            assert time.monotonic() < deadline, f"no epoch done in {JOB_TIMEOUT_S} s:\n{server.logs(job_id)}"
            time.sleep(0.2)
        kill_node(first)
        assert len(before_loss) < EPOCHS, "the run ended before the node was lost: make it longer"
        second, second_id = start_worker_node(ray_head, num_cpus=1)
        worker_nodes.append(second)
        status = server.wait(job_id, timeout=deadline - time.monotonic(), report=None)
        logs = server.logs(job_id)
    finally:
        leftovers = [pid for node in worker_nodes for pid in stop_node(node)]
    assert status.value == "SUCCEEDED", logs
    assert not leftovers, f"processes of the worker nodes outlived them: {leftovers}"

    # One attempt per worker group: one CPU per node places each over two nodes, the first over the head and
    # the lost node, the one Ray Train started after the loss over the head and the node that replaced it.
    (head_id,) = [n["node_id"] for n in listed(ray_head, "nodes") if n["is_head_node"]]
    (train_run,) = [r for r in ask(ray_head, "/api/train/v2/runs/v1")["train_runs"] if r["name"] == "lost"]
    attempts = [(a["status"], {w["node_id"] for w in a["workers"]}) for a in train_run["attempts"]]
    assert attempts == [("ERRORED", {head_id, first_id}), ("FINISHED", {head_id, second_id})], train_run

    rows = rows_written(run)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    assert all(r["workers"] == 2 for r in rows)
    assert rows[-1]["images"] == EPOCHS * 2 * (2 + 2) * 32
    assert rows[0] == before_loss[0]  # continued from a checkpoint: epoch 1 was not run again (its timings say)

    # Ray Train keeps the last two; a checkpoint written as the node was lost, before the controller took
    # it in, stays behind unmanaged. Every one loads, and --resume would take the last epoch's.
    outputs = RunDir(str(run))
    written = [d for d in outputs.list_dirs() if d.startswith("checkpoint_")]
    epochs = {read_checkpoint(outputs.child(d))[1]["epoch"] for d in written}
    assert {EPOCHS - 1, EPOCHS} <= epochs <= set(range(1, EPOCHS + 1))
    assert read_checkpoint(outputs, newest_checkpoint(outputs))[1]["epoch"] == EPOCHS
