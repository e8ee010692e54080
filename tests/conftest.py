"""Shared fixtures: one small digits teacher per test session, tiny budgets through overrides; reading
TensorBoard's event files back."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from cpsc_ray.method.metric_names import LOSS_METRICS

torch.set_num_threads(2)

# Tiny budgets: a few iterations of every step kind, small probe set.
TINY = [
    "train.epochs=2",
    "train.iterations_per_epoch=2",
    "train.batch_size=32",
    "train.g_steps=2",
    "train.s_steps=2",
    "student.warmup_fraction=0.25",
    "eval.probe_per_class=3",
    "eval.probe_steps=5",
    "teacher_training.epochs=6",
]


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    """Teachers and probe sets of this test session live in their own cache."""
    cache = tmp_path_factory.mktemp("cpsc-cache")
    os.environ["CPSC_RAY_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def digits_cfg(session_cache):
    """The digits default with tiny budgets and its teacher trained (once per session) and resolved."""
    from cpsc_ray.config import load_config
    from cpsc_ray.runs.teacher import ensure_teacher

    return ensure_teacher(load_config("digits", TINY), progress=False)


@pytest.fixture
def tiny_cfg(digits_cfg, tmp_path):
    """The session's digits config, writing its runs under this test's tmp_path."""
    return digits_cfg.model_copy(update={"output_dir": str(tmp_path / "runs")})


# moto's S3 server accepts any key pair; these are the session's, in the environment as on a cluster's nodes.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "cpsc-test-key",
    "AWS_SECRET_ACCESS_KEY": "cpsc-test-secret-4c7d0e1f",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-role lookup on a machine that has none
}


@pytest.fixture(scope="session")
def s3_credentials() -> dict[str, str]:
    """S3 credentials in this process's environment, before any Ray instance of the session starts, so its
    workers inherit them as a cluster's processes inherit their nodes' environment."""
    os.environ.update(S3_CREDENTIALS)
    return S3_CREDENTIALS


@pytest.fixture(scope="session")
def s3_server(s3_credentials) -> str:
    """moto's S3 server on the loopback, for the session: its HOST:PORT."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


def s3_bucket(endpoint: str, bucket: str) -> str:
    """A new bucket on the server, as a URI a user of MinIO or Ceph would give: its options, no credential."""
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}?endpoint_override={endpoint}&scheme=http"


@pytest.fixture(scope="session")
def ray_local(session_cache, s3_credentials):
    """One local Ray instance (2 CPUs, with the dashboard) shared by the tests that need Ray."""
    import socket

    import ray

    tests_dir = str(Path(__file__).parent)  # so workers can import loops defined in test modules
    # Workers that call Ray's State API (Train's placement-group cleaner does) find their cluster by
    # RAY_ADDRESS; without it they fail wherever another Ray instance runs on the machine.
    with socket.socket() as probe:
        probe.bind(("", 0))
        gcs_port = probe.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    address = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": tests_dir, "RAY_ADDRESS": address}},
    )
    del os.environ["RAY_GCS_SERVER_PORT"]
    yield ray
    ray.shutdown()


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """The scalars of a directory's event files, tag -> {step: value}, as TensorBoard shows them (points
    a restart purged left out); a step shown twice fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        scalars[tag] = {point.step: point.value for point in points}
        assert len(scalars[tag]) == len(points), f"{tag}: a step shown twice"
    return scalars


def assert_tensorboard_shows_what_each_trial_reported(root: Path, experiment: str) -> None:
    """Tune's TensorBoard logger wrote every report of every trial (one per epoch, or per round for
    multi-worker PBT trials) into the trial's directory: its loss terms and accuracies at that epoch."""
    trials = sorted((root / experiment / "cpsc/trials").iterdir())
    assert trials
    for trial in trials:
        (trial_dir,) = [p for p in (root / experiment).iterdir() if p.is_dir() and trial.name in p.name]
        scalars = {tag.removeprefix("ray/tune/"): points for tag, points in tensorboard_scalars(trial_dir).items()}
        rows = {r["epoch"]: r for r in pq.read_table(trial / "metrics.parquet").to_pylist()}
        assert scalars["epoch"], trial.name
        for step, epoch in scalars["epoch"].items():
            for name in (*LOSS_METRICS, "val_acc", "test_acc"):
                value = rows[int(epoch)][name]
                if value is not None and math.isfinite(value):  # a diverged epoch's NaN is not logged
                    assert scalars[name][step] == pytest.approx(value, rel=1e-5), (trial.name, epoch, name)
