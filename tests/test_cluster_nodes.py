"""A cluster as a team has one (tests/ray_nodes.py): a head that keeps the drivers (it carries the custom resource
``cpsc_driver``) and a worker node with a disk of its own where the head sees shared storage (a tmpfs in a mount
namespace of its own), S3 credentials in the nodes' environment only. A run on storage that node cannot read is
refused, naming it; a distillation and a tuning run on S3 write the secret nowhere, and their drivers and Ray
Train's controllers stay on the head."""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import TINY, s3_bucket
from ray_nodes import (
    Head,
    Node,
    copy_of_the_code,
    listed,
    running_head,
    start_worker_node,
    stop_node,
    with_a_directory_of_its_own,
)

from cpsc_ray.cluster.submit import Driver, JobServer, runtime_env

SECRET = f"cluster-secret-{uuid.uuid4().hex}"
DRIVER = "cpsc_driver"
JOB_TIMEOUT_S = 300


@dataclass
class Cluster:
    head: Head
    worker: Node
    worker_id: str
    # Where the worker node sees a disk of its own, and the head shared storage; None where this machine cannot
    # give a node a mount namespace of its own.
    local: Path | None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    local = tmp_path_factory.mktemp("node-local")
    wrapper = with_a_directory_of_its_own(local)
    credentials = {"AWS_ACCESS_KEY_ID": "cluster-key", "AWS_SECRET_ACCESS_KEY": SECRET}
    with running_head(1, f'--resources={{"{DRIVER}": 10}}', env=credentials) as head:
        worker, worker_id = start_worker_node(head, num_cpus=1, wrapper=wrapper or ())
        try:
            yield Cluster(head, worker, worker_id, local if wrapper else None)
        finally:
            stop_node(worker)


def test_storage_a_node_cannot_read_is_refused_naming_the_node(cluster, digits_cfg):
    # A node with a disk of its own needs root or user namespaces; a CI runner without either skips, saying so.
    if cluster.local is None:
        pytest.skip("no mount namespace for a node here (needs root or unprivileged user namespaces)")
    storage = cluster.local / "runs"
    command = ["distill", "--workers", "2", "--cpus-per-worker", "0.5", "--storage", str(storage), *TINY]
    result = subprocess.run(
        [sys.executable, "-m", "cpsc_ray", *command],
        env={**cluster.head.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.head.gcs_port}"},
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: "), result.stderr
    (address,) = [n["node_ip"] for n in listed(cluster.head, "nodes") if n["node_id"] == cluster.worker_id]
    assert f"node {cluster.worker_id[:12]} ({address}) cannot read the storage" in lines[-1]
    assert "every node must see the same storage" in lines[-1]
    assert all(p.name.startswith(".") for p in storage.iterdir()), "no run was started there"


def test_no_secret_is_written_and_drivers_stay_on_the_driver_nodes(
    cluster, digits_cfg, session_cache, s3_server, tmp_path
):
    bucket = f"scanned-{uuid.uuid4().hex[:8]}"
    storage = s3_bucket(s3_server, bucket)
    code = copy_of_the_code(tmp_path / "code")
    server = JobServer(cluster.head.url, token=cluster.head.token)
    env = runtime_env(code / "launch/runtime_env.yaml", str(code), {"CPSC_RAY_CACHE": str(session_cache)})
    common = ["--cpus-per-worker", "0.5", "--storage", storage, *TINY]
    commands = [
        ["distill", "--name", "scanned", "--workers", "2", *common],
        ["tune", "--name", "scanned-tune", "--space", "digits_pbt", "--num-samples", "1", "--workers-per-trial", "2"]
        + ["--driver-resource", DRIVER, *common],
    ]
    jobs = []
    for command in commands:
        job_id = server.submit(command, env, Driver(resource=DRIVER), f"cpsc-ray-scan-{uuid.uuid4().hex[:8]}")
        status = server.wait(job_id, timeout=JOB_TIMEOUT_S, report=None)
        assert status.value == "SUCCEEDED", server.logs(job_id)
        jobs.append(job_id)

    # Every object the runs wrote, the jobs' logs and records (entrypoint, runtime env), the nodes' Ray logs.
    s3 = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http")
    objects = [i.path for i in s3.get_file_info(pafs.FileSelector(bucket, recursive=True)) if i.is_file]
    assert len(objects) > 20 and any("scanned-tune/" in o for o in objects)
    written = {path: s3.open_input_stream(path).read() for path in objects}
    written |= {f"logs of {job}": server.logs(job).encode() for job in jobs}
    written |= {f"record of {job}": repr(server.info(job)).encode() for job in jobs}
    for node in (cluster.head.node, cluster.worker):
        written |= {str(p): p.read_bytes() for p in node.temp.rglob("*") if p.is_file() and not p.is_socket()}
    # Where the secret was written, with what precedes it there.
    leaks = {
        where: data[max(0, at - 300) : at] for where, data in written.items() if (at := data.find(SECRET.encode())) >= 0
    }
    assert leaks == {}

    # The jobs' drivers, the tuning trial's own process and every Ray Train controller ran on the head, the node
    # that carries the driver resource. Train's workers are not bound to it: the head, less the driver's 0.1 CPU,
    # holds at most one of a run's two half-CPU workers (Ray packs them on either node), so the worker node held one.
    (head_id,) = [n["node_id"] for n in listed(cluster.head, "nodes") if n["is_head_node"]]
    actors = listed(cluster.head, "actors")
    controllers = [a["node_id"] for a in actors if a["class_name"] == "TrainController"]
    trials = [a["node_id"] for a in actors if "tune_trial" in a["class_name"] or "ImplicitFunc" in a["class_name"]]
    drivers = [server.info(job).driver_node_id for job in jobs]
    assert len(controllers) == 2 and len(trials) == 1, [(a["class_name"], a["node_id"]) for a in actors]
    assert set(controllers + trials + drivers) == {head_id}
    workers = {a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"}
    assert cluster.worker_id in workers and workers <= {head_id, cluster.worker_id}
