"""What would break at cluster scale (issue #11), decided on CPU with Ray's start or the devices mocked."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from conftest import TINY
from ray.tune import Callback

from cpsc_ray.cli import main
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
    with pytest.raises(ConfigError, match=r"whole number of GPUs \(1\)"):
        check_gpus_per_worker(2, 0.75, "--workers 2 --gpus-per-worker 0.75")


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


def test_relative_paths_are_made_absolute_in_the_driver(digits_cfg, tmp_path, monkeypatch):
    from cpsc_ray.config import with_values
    from cpsc_ray.runs.setup import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CPSC_RAY_CACHE", "cache")
    cfg = with_values(digits_cfg, {"data.root": "data", "teacher.weights": "t/w.pt", "output_dir": "runs"})
    resolved = with_absolute_paths(cfg)
    assert (resolved.data.root, resolved.teacher.weights) == (str(tmp_path / "data"), str(tmp_path / "t/w.pt"))
    assert resolved.output_dir == str(tmp_path / "runs")
    assert os.environ["CPSC_RAY_CACHE"] == str(tmp_path / "cache")
    remote = with_values(digits_cfg, {"teacher.weights": "s3://bucket/w.pt", "output_dir": "s3://bucket/runs"})
    assert with_absolute_paths(remote).teacher.weights == "s3://bucket/w.pt"
    assert with_absolute_paths(remote).output_dir == "s3://bucket/runs"


def relative_teacher(digits_cfg, tmp_path: Path, monkeypatch) -> str:
    """The session's teacher copied under tmp_path, named by a path relative to it (now the cwd)."""
    source = Path(digits_cfg.teacher.weights).parent
    shutil.copytree(source, tmp_path / "teacher")
    monkeypatch.chdir(tmp_path)
    return f"teacher/{Path(digits_cfg.teacher.weights).name}"


def test_a_relative_teacher_path_works_under_workers(ray_local, digits_cfg, tmp_path, monkeypatch):
    weights = relative_teacher(digits_cfg, tmp_path, monkeypatch)
    code = main(
        ["distill", "--name", "rel", "--workers", "2", "--storage", "runs", *TINY, "train.epochs=1"]
        + [f"teacher.weights={weights}"]
    )
    assert code == 0
    assert pq.read_table(tmp_path / "runs/rel/metrics.parquet").num_rows == 1


def test_a_relative_teacher_path_works_under_tune(ray_local, digits_cfg, tmp_path, monkeypatch):
    """On a 2-worker trial, whose workers run elsewhere still; its rank 0 reports reach Tune's TensorBoard."""
    from conftest import assert_tensorboard_shows_what_each_trial_reported

    from cpsc_ray.config import with_values

    weights = relative_teacher(digits_cfg, tmp_path, monkeypatch)
    cfg = with_values(digits_cfg, {"teacher.weights": weights, "train.epochs": 2})
    options = TuneOptions(
        space="digits_pbt", storage="runs", name="rel", num_samples=1, workers_per_trial=2, cpus_per_worker=0.5
    )
    summary = run_tune(cfg, options)
    assert not summary["errored"] and len(summary["trials"]) == 1
    assert_tensorboard_shows_what_each_trial_reported(tmp_path / "runs", "rel")


def test_optuna_ranks_a_trial_by_its_best_epoch_as_the_report_does(digits_cfg, nothing_starts):
    from cpsc_ray.cluster.reports import tune_metrics
    from cpsc_ray.cluster.search_space import load_search_space
    from cpsc_ray.cluster.tune import build_search

    history = [{"epoch": 1, "val_acc": 0.4}, {"epoch": 2, "val_acc": 0.9}, {"epoch": 3, "val_acc": 0.6}]
    metrics = tune_metrics(history[-1], history, "val_acc", images_spent=10)
    assert (metrics["score"], metrics["best_score"]) == (0.6, 0.9)  # PBT compares now, Optuna the best
    space = load_search_space("digits_optuna", digits_cfg)
    search = build_search(TuneOptions(space="digits_optuna", search="optuna"), space, ("best_score", "max"), None)
    assert search.metric == "best_score"
    options = TuneOptions(space="digits_optuna", search="optuna", scheduler="asha", minimize_device_seconds=True)
    with pytest.raises(ConfigError, match="Pareto front"):
        run_tune(digits_cfg, options)


class Crash(Exception):
    pass


def crash_after(monkeypatch, epoch: int) -> None:
    from cpsc_ray.runs.run import DistillRun

    real = DistillRun.run_epoch

    def run_epoch(self):
        row = real(self)
        if row["epoch"] == epoch:
            raise Crash()
        return row

    monkeypatch.setattr(DistillRun, "run_epoch", run_epoch)


def epochs_and_workers(run: Path) -> list[tuple[int, int]]:
    return [(r["epoch"], r["workers"]) for r in pq.read_table(run / "metrics.parquet").to_pylist()]


def test_resume_continues_from_the_newest_checkpoint_of_either_mode(ray_local, digits_cfg, tmp_path, monkeypatch):
    storage = str(tmp_path / "runs")
    # In process first, interrupted after its epoch-2 checkpoint; then resumed on 2 Train workers.
    crash_after(monkeypatch, 3)
    with pytest.raises(Crash):
        main(
            ["distill", "--name", "mixed", *TINY, "train.epochs=4", "train.checkpoint_every=2", f"output_dir={storage}"]
        )
    monkeypatch.undo()
    assert main(["distill", "--resume", "mixed", "--workers", "2", "--storage", storage]) == 0
    assert epochs_and_workers(tmp_path / "runs/mixed") == [(1, 1), (2, 1), (3, 2), (4, 2)]

    # Train workers first, failed for good after their epoch-2 checkpoint; then resumed in process.
    code = main(
        ["distill", "--name", "trained", "--workers", "2", "--storage", storage, *TINY, "train.epochs=3"]
        + ["--max-failures", "0", "--inject-fault-at-epoch", "3"]
    )
    assert code == 1
    assert main(["distill", "--resume", "trained", f"output_dir={storage}"]) == 0
    assert epochs_and_workers(tmp_path / "runs/trained") == [(1, 2), (2, 2), (3, 1)]


def test_a_resume_with_nothing_to_continue_from_is_refused(digits_cfg, tmp_path, monkeypatch, capsys):
    storage = str(tmp_path / "runs")
    crash_after(monkeypatch, 1)
    with pytest.raises(Crash):  # no checkpoint is due before epoch 4
        main(
            ["distill", "--name", "early", *TINY, "train.epochs=4", "train.checkpoint_every=4", f"output_dir={storage}"]
        )
    monkeypatch.undo()
    assert main(["distill", "--resume", "early", f"output_dir={storage}"]) == 2  # a usage error, as bad config is
    assert "no checkpoint to continue from" in capsys.readouterr().err
    assert epochs_and_workers(tmp_path / "runs/early") == [(1, 1)], "the run's metrics are kept"


def test_an_exploit_is_recorded_once(tiny_cfg, tmp_path):
    from cpsc_ray.runs.lineage import Exploit, record_exploit
    from cpsc_ray.runs.setup import prepare_engine
    from cpsc_ray.storage import Storage

    engine = prepare_engine(tiny_cfg).engine
    outputs = Storage(str(tmp_path / "trial"))
    exploit = Exploit("source_00001", 2, "/checkpoints/source/e00002", {"loss.alpha": 1.0}, {"loss.alpha": 1.2})
    record_exploit(outputs, engine, exploit)
    record_exploit(outputs, engine, exploit)  # the round restarted before its first checkpoint
    assert len(outputs.read_json("lineage.json")) == 1


def test_lost_epochs_are_charged_and_never_give_the_best_student(digits_cfg, tmp_path, monkeypatch):
    """Epoch 3 is the best so far, then lost (the process dies before its checkpoint). The resumed run
    keeps the checkpoint's best student, epoch 2's, and charges epoch 3's work to the epoch that reruns it."""
    import io

    import torch
    from safetensors.torch import load_file

    from cpsc_ray.method.engine import DistillEngine
    from cpsc_ray.results.store import read_results

    real_evaluate = DistillEngine.evaluate
    monkeypatch.setattr(DistillEngine, "evaluate", lambda self: {**real_evaluate(self), "val": self.epoch / 10})
    crash_after(monkeypatch, 3)
    run, storage = tmp_path / "runs/lost", str(tmp_path / "runs")
    with pytest.raises(Crash):
        main(
            ["distill", "--name", "lost", *TINY, "train.epochs=4", "train.checkpoint_every=2", f"output_dir={storage}"]
        )
    lost = pq.read_table(run / "metrics.parquet").to_pylist()[-1]
    assert lost["epoch"] == 3 and json.loads((run / "best/student.json").read_text())["selected_by"]["epoch"] == 3
    checkpointed = torch.load(io.BytesIO((run / "checkpoints/last/state.pt").read_bytes()), weights_only=True)
    monkeypatch.undo()
    monkeypatch.setattr(DistillEngine, "evaluate", lambda self: {**real_evaluate(self), "val": 0.0})  # never better

    assert main(["distill", "--resume", "lost", f"output_dir={storage}"]) == 0
    assert json.loads((run / "best/student.json").read_text())["selected_by"]["epoch"] == 2
    best = load_file(run / "best/student.safetensors")
    assert all(torch.equal(best[k], v) for k, v in checkpointed["student"].items()), "the best is epoch 2's student"
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["lost_images"] == lost["epoch_images"] and rows[3]["lost_images"] == 0
    assert rows[2]["overhead_s"] >= lost["epoch_s"] and rows[3]["overhead_s"] == 0
    trial = read_results([storage]).trials.iloc[0]
    assert trial.images == sum(r["epoch_images"] for r in rows) + lost["epoch_images"]
    assert trial.device_s >= sum(r["epoch_s"] for r in rows) + lost["epoch_s"]


class Interrupted(Exception):
    pass


class InterruptAtEpoch(Callback):
    """Stops the experiment once, at the start of a step after a trial has reported ``epoch``."""

    def __init__(self, epoch: int, marker: Path):
        self.epoch, self.marker = epoch, marker

    def on_step_begin(self, iteration, trials, **info):
        reached = any((t.last_result or {}).get("epoch", 0) >= self.epoch for t in trials)
        if reached and not self.marker.exists():
            self.marker.write_text("interrupted")
            raise Interrupted()


def live_placement_groups() -> list[dict]:
    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


def test_a_multi_worker_trial_without_pbt_is_one_train_run_that_resumes(ray_local, digits_cfg, tmp_path, monkeypatch):
    import time

    import pandas as pd

    from cpsc_ray.config import with_values

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")
    root = tmp_path / "runs"
    cfg = with_values(digits_cfg, {"train.epochs": 6, "train.checkpoint_every": 1})
    options = TuneOptions(
        space="digits_pbt",
        scheduler="asha",
        num_samples=1,
        workers_per_trial=2,
        cpus_per_worker=0.5,
        storage=str(root),
        name="asha",
    )
    with pytest.raises(Interrupted):
        run_tune(cfg, options, callbacks=[InterruptAtEpoch(2, tmp_path / "interrupted")])
    (trial_dir,) = (root / "asha/cpsc/trials").iterdir()
    before = pd.read_parquet(trial_dir / "metrics.parquet").set_index("epoch")
    assert 2 <= len(before) < 6
    # The interrupted trial's worker group and placement group are freed (Ray issue #54305).
    deadline = time.monotonic() + 60
    while live_placement_groups() and time.monotonic() < deadline:
        time.sleep(1)
    assert not live_placement_groups()

    summary = run_tune(cfg, options, resume=True)
    assert not summary["errored"]
    after = pd.read_parquet(trial_dir / "metrics.parquet").set_index("epoch")
    assert list(after.index) == [1, 2, 3, 4, 5, 6]
    # It continued from the Train run's checkpoint: the epochs before it were not trained again.
    assert (after.loc[[1, 2], "wall_s"] == before.loc[[1, 2], "wall_s"]).all()
    # One Train run, named after the trial, kept the checkpoints; Tune got none.
    assert [p.name for p in (root / "asha/cpsc/rounds").iterdir()] == [trial_dir.name]
    assert not list((root / "asha").glob("*/checkpoint_*"))


def test_a_request_the_cluster_can_never_hold_is_refused_naming_both(ray_local, tiny_cfg):
    runs = Path(tiny_cfg.output_dir)
    with pytest.raises(ConfigError, match=r"--workers 4 .* asks for 4 worker\(s\) of 1 CPU, .* it has 2 CPU"):
        run_distributed(tiny_cfg, workers=4, cpus_per_worker=1)
    with pytest.raises(ConfigError, match=r"of 1 CPU, 1 GPU, .* 0 GPU \(largest node 0\)"):
        run_distributed(tiny_cfg, workers=1, gpus_per_worker=1)
    assert not runs.exists(), "a refused request writes nothing"
    options = TuneOptions(space="digits_pbt", workers_per_trial=2, cpus_per_worker=1, max_concurrent=2)
    at_once = r"--max-concurrent 2 asks for 2 worker\(s\) of 1 CPU plus 0.01 CPU for the trial itself x 2 trials"
    with pytest.raises(ConfigError, match=at_once):
        run_tune(tiny_cfg, options)
    with pytest.raises(ConfigError, match=r"2 worker\(s\) of 1.5 CPU.*\(largest node 2\)"):
        run_tune(tiny_cfg, TuneOptions(space="digits_pbt", workers_per_trial=2, cpus_per_worker=1.5))
    # Two 1-CPU workers fill the 2 CPUs, and the trial itself holds a sliver more: it would wait forever.
    with pytest.raises(ConfigError, match=r"2 worker\(s\) of 1 CPU plus 0.01 CPU for the trial itself"):
        run_tune(tiny_cfg, TuneOptions(space="digits_pbt", workers_per_trial=2, cpus_per_worker=1))


def test_a_request_that_waits_says_what_it_waits_for_and_is_not_charged_for_it(
    ray_local, tiny_cfg, monkeypatch, capsys
):
    """Another job holds half a CPU for 20 s after the run's worker group asks for it: the run says what it
    waits for, records the wait as queued_s, and charges no device-seconds for it."""
    import threading
    import time

    from cpsc_ray.cluster import resources
    from cpsc_ray.results.store import read_results

    hold_s = 20
    monkeypatch.setattr(resources, "WAIT_REPORT_S", 2.0)
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


class RecordEpochs(Callback):
    """Appends every reported epoch to a file (the copy Tune restores with the experiment goes on), and
    stops the experiment once, when a trial first reports ``interrupt_at``."""

    def __init__(self, log: Path, interrupt_at: int):
        self.log, self.interrupt_at = log, interrupt_at

    def on_trial_result(self, iteration, trials, trial, result, **info):
        resumed = self.log.with_suffix(".interrupted").exists()
        with self.log.open("a") as out:
            out.write(f"{'after' if resumed else 'before'} {trial.trial_id} {result['epoch']}\n")

    def on_step_begin(self, iteration, trials, **info):
        marker = self.log.with_suffix(".interrupted")
        if not marker.exists() and any((t.last_result or {}).get("epoch", 0) >= self.interrupt_at for t in trials):
            marker.write_text("interrupted")
            raise Interrupted()


def test_a_resumed_pbt_experiment_perturbs_where_trials_checkpoint(ray_local, digits_cfg, tmp_path, monkeypatch):
    """Interrupted after the perturbation at epoch 2 and resumed: a scheduler that forgot its state would
    perturb at epoch 3, between checkpoints, and the clone would report epoch 3 twice."""
    from cpsc_ray.config import with_values
    from cpsc_ray.results.store import read_results

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")
    cfg = with_values(digits_cfg, {"train.epochs": 6})
    options = TuneOptions(
        space="digits_pbt",
        scheduler="pbt",
        num_samples=4,
        perturbation_interval=2,
        keep_checkpoints=None,
        storage=str(tmp_path / "runs"),
        name="pbt",
    )
    log = tmp_path / "epochs.log"
    with pytest.raises(Interrupted):
        run_tune(cfg, options, callbacks=[RecordEpochs(log, interrupt_at=3)])
    summary = run_tune(cfg, options, resume=True)
    assert not summary["errored"] and all(t["epochs"] == 6 for t in summary["trials"])
    reported: dict[str, list[int]] = {}
    for line in log.read_text().splitlines():
        phase, trial_id, epoch = line.split()
        if phase == "after":
            reported.setdefault(trial_id, []).append(int(epoch))
    assert len(reported) == 4
    for trial_id, epochs in reported.items():
        assert epochs == sorted(set(epochs)), f"{trial_id} reran epochs after the resume: {epochs}"
    lineage = read_results([str(tmp_path / "runs")], experiments=["pbt"]).lineage
    assert set(lineage.epoch) >= {2, 4} and set(lineage.epoch) <= {2, 4, 6}, "exploits before and after the resume"


def test_a_user_error_on_the_teachers_worker_reaches_the_driver_in_one_line(ray_local, digits_cfg, tmp_path, capsys):
    missing = tmp_path / "no-teacher.safetensors"
    code = main(["distill", "--workers", "2", "--storage", str(tmp_path / "runs"), *TINY, f"teacher.weights={missing}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(missing) in err, err
    assert not (tmp_path / "runs").exists(), "nothing is written"


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
    from cpsc_ray.cluster.tune import _fitting_concurrency

    four_gpus = {"CPU": 48, "GPU": 4}
    eight_gpu_worker = Request(1, 1, 8, "a worker of 8 GPUs")
    cluster_of(monkeypatch, [four_gpus, four_gpus])
    never = r"8 GPU, and this cluster can never hold .* 8 GPU \(largest node 4\) on 2 node"
    with pytest.raises(ConfigError, match=never):
        check_fits(eight_gpu_worker)

    cluster_of(monkeypatch, [four_gpus, four_gpus], [("p4d", {"CPU": 96, "GPU": 8}, 2)])
    check_fits(eight_gpu_worker)  # a node the autoscaler may start holds it
    with pytest.raises(ConfigError, match=r"largest node or node type 8\).* may add p4d \(96 CPU 8 GPU\) up to 2"):
        check_fits(Request(1, 1, 16, "a worker of 16 GPUs"))
    with pytest.raises(ConfigError, match=r"x 25 trials at once"):
        check_fits(Request(1, 1, 1, "25 one-GPU trials", groups=25))  # 8 GPUs now, 16 more at most
    # Trials at once are sized from the cluster at its largest, so they queue for the nodes that can come.
    one_gpu_trials = TuneOptions(space="digits_pbt", gpus_per_worker=1, num_samples=32)
    assert _fitting_concurrency(one_gpu_trials) == 8 + 2 * 8
    cluster_of(monkeypatch, [four_gpus], [("g5", {"CPU": 48, "GPU": 4}, -1)])  # no limit on that type
    assert _fitting_concurrency(one_gpu_trials) == 32

    cluster_of(monkeypatch, [four_gpus])  # an autoscaler that reports no node types: only --autoscaling lets it by
    with pytest.raises(ConfigError, match="pass --autoscaling if the cluster adds nodes on demand"):
        check_fits(eight_gpu_worker)
    check_fits(eight_gpu_worker, autoscaling=True)


def test_a_train_run_waits_for_its_workers_and_their_collectives_as_long_as_it_is_told(monkeypatch, tmp_path):
    """The start timeout reaches Ray Train's controller (through the environment it is started with) and a
    timed-out start counts as a restart instead of being retried forever; the collective timeout reaches torch."""
    from cpsc_ray.cluster.recovery import Recovery
    from cpsc_ray.cluster.train import START_TIMEOUT_VAR, WorkerLoop, build_trainer, scaling
    from cpsc_ray.runs.setup import RunRole
    from cpsc_ray.storage import Storage

    monkeypatch.delenv(START_TIMEOUT_VAR, raising=False)
    loop = WorkerLoop(config={}, outputs=str(tmp_path), role=RunRole())
    trainer = build_trainer(loop, scaling(2, 0, 1), "run", Storage(str(tmp_path)), Recovery(3, 120, 45), keep=2)
    assert os.environ[START_TIMEOUT_VAR] == "120"
    failure = trainer.run_config.failure_config
    assert (failure.max_failures, failure.controller_failure_limit) == (3, 3)
    assert trainer.backend_config.timeout_s == 45


def test_tune_retries_and_train_restarts_are_two_settings_and_trials_can_stay_on_driver_nodes(digits_cfg, tmp_path):
    from cpsc_ray.cluster.search_space import load_search_space
    from cpsc_ray.cluster.trial import trainable
    from cpsc_ray.cluster.tune import _new_setup
    from cpsc_ray.storage import Storage

    options = TuneOptions(
        space="digits_pbt", workers_per_trial=2, max_failures=1, max_restarts=3, driver_resource="on_demand"
    )
    space = load_search_space("digits_pbt", digits_cfg)
    setup = _new_setup(Storage(str(tmp_path)), digits_cfg, options, space, "exp", "val_acc")
    assert setup.recovery.max_restarts == 3 and setup.options["max_failures"] == 1
    # A multi-worker trial's own process holds a sliver of the driver resource (Ray Train's controller follows it).
    assert trainable(setup)._resources.required_resources == {"CPU": 0.01, "on_demand": 0.001}
