"""What would break at cluster scale (issue #11), decided on CPU with Ray's start or the devices mocked."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from cpsc_ray.cluster.train import check_gpus_per_worker, run_distributed
from cpsc_ray.cluster.tune import TuneOptions, run_tune
from cpsc_ray.config import ConfigError


@pytest.fixture
def nothing_starts(monkeypatch):
    """Ray must not be started: a refusal comes before anything runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the request was checked")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


def test_two_ddp_workers_never_share_a_gpu(tiny_cfg, nothing_starts):
    with pytest.raises(ConfigError, match="--workers 2 --gpus-per-worker 0.5 .* NCCL refuses two ranks"):
        run_distributed(tiny_cfg, workers=2, gpus_per_worker=0.5)
    assert not Path(tiny_cfg.output_dir).exists(), "nothing is written for a refused request"
    options = TuneOptions(space="digits_pbt", scheduler="pbt", workers_per_trial=2, gpus_per_worker=0.5)
    with pytest.raises(ConfigError, match="--gpus-per-trial 1 --workers-per-trial 2 .* whole number of GPUs"):
        run_tune(tiny_cfg, options)


def test_fractional_gpus_stay_allowed_for_one_worker():
    check_gpus_per_worker(1, 0.25, "--gpus-per-trial 0.25")
    check_gpus_per_worker(2, 1.0, "--workers 2 --gpus-per-worker 1")
    check_gpus_per_worker(4, 0.0, "--workers 4")  # CPU workers
    with pytest.raises(ConfigError, match=r"whole number of GPUs \(2\)"):
        check_gpus_per_worker(2, 1.5, "--workers 2 --gpus-per-worker 1.5")


def test_pbt_explores_inside_the_search_space(digits_cfg):
    import random

    from ray.tune.schedulers import pbt

    from cpsc_ray.cluster.search_space import load_search_space
    from cpsc_ray.cluster.tune import build_scheduler

    space = load_search_space("digits_pbt", digits_cfg)
    scheduler = build_scheduler(TuneOptions(space="digits_pbt", scheduler="pbt"), space, epochs=8)
    ints = [k for k, p in space.params.items() if p.distribution == "int"]
    # Start at the edges, where unclipped factors leave the space: floats at their top, integers at 1.
    config = {k: (p.high if p.distribution != "int" else int(p.low)) for k, p in space.params.items()}
    seen = {k: set() for k in ints}
    random.seed(0)
    for _ in range(200):
        config, _ = pbt._explore(
            config,
            scheduler._hyperparam_mutations,
            scheduler._resample_probability,
            scheduler._perturbation_factors,
            scheduler._custom_explore_fn,
        )
        for key, p in space.params.items():
            assert p.low <= config[key] <= p.high, f"{key}={config[key]} left [{p.low}, {p.high}]"
        for key in ints:
            assert isinstance(config[key], int)
            seen[key].add(config[key])
    assert all(len(values) >= 3 for values in seen.values()), seen  # small integers move, not only on resample
