"""Shared fixtures: one small digits teacher per test session, tiny budgets through overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
    from cpsc_ray.runs.setup import ensure_teacher

    return ensure_teacher(load_config("digits", TINY), progress=False)


@pytest.fixture
def tiny_cfg(digits_cfg, tmp_path):
    """The session's digits config, writing its runs under this test's tmp_path."""
    return digits_cfg.model_copy(update={"output_dir": str(tmp_path / "runs")})


@pytest.fixture(scope="session")
def ray_local(session_cache):
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
