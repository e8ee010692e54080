"""What a run asks of a cluster that changes under it (issue 21), decided on CPU with Ray's answers mocked, and on
the session's local Ray: requests checked against the nodes an autoscaler may add, how long a worker group waits
for its resources and its collectives, where trials' own processes run, and time queued kept out of compute."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from cpsc_ray.cluster.train import run_distributed
from cpsc_ray.cluster.tune import TuneOptions
from cpsc_ray.errors import InputError


def test_a_request_that_waits_says_what_it_waits_for_and_is_not_charged_for_it(
    ray_local, tiny_cfg, monkeypatch, capsys
):
    """Another job holds half a CPU for 20 s after the run's worker group asks for it: the run says what it
    waits for, records the wait as queued_s, and charges no device-seconds for it."""
    import threading
    import time

    from cpsc_ray.cluster import resources
    from cpsc_ray.results.tables import read_results

    hold_s = 20
    monkeypatch.setattr(resources, "WAIT_NOTICE_S", 2.0)
    held = ray.util.placement_group([{"CPU": 0.5}])  # another job's half CPU...
    ray.get(held.ready())
    run = Path(tiny_cfg.output_dir) / "waited"
    first_row_at = []

    def release_once_waited() -> None:  # ...released once the run's worker group has waited 20 s
        deadline = time.monotonic() + 300
        while len(resources.pending_groups()) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(hold_s)
        ray.util.remove_placement_group(held)
        while not (run / "metrics.parquet").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        first_row_at.append(time.monotonic())

    threading.Thread(target=release_once_waited, daemon=True).start()
    started = time.monotonic()
    summary = run_distributed(tiny_cfg.model_copy(update={"name": "waited"}), workers=2, cpus_per_worker=1)
    assert summary["epochs"] == 2
    out = capsys.readouterr().out
    assert "waiting for resources: 1 worker group(s) pending, for 2 worker(s) of 1 CPU; free now: 1.5 CPU" in out

    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert rows[0]["queued_s"] >= hold_s and rows[1]["queued_s"] == 0
    # The set-up charged (times 2 workers) is at most what passed before the first epoch ended, less the wait.
    assert rows[0]["overhead_s"] <= 2 * (first_row_at[0] - started - hold_s)
    trial = read_results([tiny_cfg.output_dir]).trials.iloc[0]
    assert trial.queued_s == rows[0]["queued_s"]
    assert trial.device_s == pytest.approx(sum(r["epoch_s"] * 2 + r["overhead_s"] for r in rows))


def cluster_of(monkeypatch, nodes: list[dict], node_types: list[tuple[str, dict, int]] | None = None) -> None:
    """Ray's answers mocked: the alive nodes, and the node types an autoscaler reported (name, resources, max)."""
    from ray._private.state import state
    from ray.core.generated import autoscaler_pb2

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": node} for node in nodes])
    groups = [
        autoscaler_pb2.NodeGroupConfig(name=name, resources=resources, min_count=0, max_count=most)
        for name, resources, most in node_types or []
    ]
    config = autoscaler_pb2.ClusterConfig(node_group_configs=groups) if node_types else None
    monkeypatch.setattr(state, "get_cluster_config", lambda: config)


def test_the_fit_check_knows_the_node_types_an_autoscaler_may_start(monkeypatch):
    from cpsc_ray.cluster.resources import Request, check_fits
    from cpsc_ray.cluster.tune.driver import _fitting_concurrency

    four_gpus = {"CPU": 48, "GPU": 4}
    eight_gpu_worker = Request(1, 1, 8, "a worker of 8 GPUs")
    cluster_of(monkeypatch, [four_gpus, four_gpus])
    never = r"8 GPU, and this cluster can never hold .* 8 GPU \(largest node 4\) on 2 node"
    with pytest.raises(InputError, match=never):
        check_fits(eight_gpu_worker)

    cluster_of(monkeypatch, [four_gpus, four_gpus], [("p4d", {"CPU": 96, "GPU": 8}, 2)])
    check_fits(eight_gpu_worker)  # a node the autoscaler may start holds it
    with pytest.raises(InputError, match=r"largest node or node type 8\).* may add p4d \(96 CPU 8 GPU\) up to 2"):
        check_fits(Request(1, 1, 16, "a worker of 16 GPUs"))
    with pytest.raises(InputError, match=r"x 25 trials at once"):
        check_fits(Request(1, 1, 1, "25 one-GPU trials", groups=25))  # 8 GPUs now, 16 more at most
    # Trials at once are sized from the cluster at its largest, so they queue for the nodes that can come.
    one_gpu_trials = TuneOptions(space="digits_pbt", gpus_per_worker=1, num_samples=32)
    assert _fitting_concurrency(one_gpu_trials) == 8 + 2 * 8
    cluster_of(monkeypatch, [four_gpus], [("g5", {"CPU": 48, "GPU": 4}, -1)])  # no limit on that type
    assert _fitting_concurrency(one_gpu_trials) == 32

    cluster_of(monkeypatch, [four_gpus])  # an autoscaler that reports no node types: only --autoscaling lets it by
    with pytest.raises(InputError, match="pass --autoscaling if the cluster adds nodes on demand"):
        check_fits(eight_gpu_worker)
    check_fits(eight_gpu_worker, autoscaling=True)


def test_a_train_run_waits_for_its_workers_and_their_collectives_as_long_as_it_is_told(monkeypatch, tmp_path):
    """The start timeout reaches Ray Train's controller (through the environment it is started with) and a
    timed-out start counts as a restart instead of being retried forever; the collective timeout reaches torch."""
    from cpsc_ray.cluster.recovery import Recovery
    from cpsc_ray.cluster.train import START_TIMEOUT_VAR, WorkerLoop, build_trainer, scaling
    from cpsc_ray.runs.assembly import RunRole
    from cpsc_ray.storage import Storage

    monkeypatch.delenv(START_TIMEOUT_VAR, raising=False)
    loop = WorkerLoop(config={}, outputs=str(tmp_path), role=RunRole())
    trainer = build_trainer(loop, scaling(2, 0, 1), "run", Storage(str(tmp_path)), Recovery(3, 120, 45), keep=2)
    assert os.environ[START_TIMEOUT_VAR] == "120"
    failure = trainer.run_config.failure_config
    assert (failure.max_failures, failure.controller_failure_limit) == (3, 3)
    assert trainer.backend_config.timeout_s == 45


def test_tune_retries_and_train_restarts_are_two_settings_and_trials_can_stay_on_driver_nodes(digits_cfg, tmp_path):
    from cpsc_ray.cluster.tune.driver import _new_record
    from cpsc_ray.cluster.tune.search_space import load_search_space
    from cpsc_ray.cluster.tune.trial import trainable
    from cpsc_ray.layout import RootDir

    options = TuneOptions(
        space="digits_pbt", workers_per_trial=2, max_failures=1, max_restarts=3, driver_resource="on_demand"
    )
    space = load_search_space("digits_pbt", digits_cfg)
    record = _new_record(RootDir(str(tmp_path)), digits_cfg, options, space, "exp", "val_acc")
    assert record.recovery.max_restarts == 3 and record.options["max_failures"] == 1
    # A multi-worker trial's own process holds a sliver of the driver resource (Ray Train's controller follows it).
    assert trainable(record)._resources.required_resources == {"CPU": 0.01, "on_demand": 0.001}
