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
from cpsc_ray.errors import InputError


@pytest.fixture
def nothing_starts(monkeypatch):
    """Ray must not be started: a refusal comes before anything runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the request was checked")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


def test_two_ddp_workers_never_share_a_gpu(tiny_cfg, nothing_starts):
    with pytest.raises(InputError, match="--workers 2 --gpus-per-worker 0.5 .* NCCL refuses two ranks"):
        run_distributed(tiny_cfg, workers=2, gpus_per_worker=0.5)
    assert not Path(tiny_cfg.output_dir).exists(), "nothing is written for a refused request"
    options = TuneOptions(space="digits_pbt", scheduler="pbt", workers_per_trial=2, gpus_per_worker=0.5)
    with pytest.raises(InputError, match="--gpus-per-trial 1 --workers-per-trial 2 .* whole number of GPUs"):
        run_tune(tiny_cfg, options)


def test_fractional_gpus_stay_allowed_for_one_worker():
    check_gpus_per_worker(1, 0.25, "--gpus-per-trial 0.25")
    check_gpus_per_worker(2, 1.0, "--workers 2 --gpus-per-worker 1")
    check_gpus_per_worker(4, 0.0, "--workers 4")  # CPU workers
    with pytest.raises(InputError, match=r"whole number of GPUs \(1\)"):
        check_gpus_per_worker(2, 0.75, "--workers 2 --gpus-per-worker 0.75")


def test_pbt_explores_inside_the_search_space(digits_cfg):
    import random

    from ray.tune.schedulers import pbt

    from cpsc_ray.cluster.tune.driver import build_scheduler
    from cpsc_ray.cluster.tune.search_space import load_search_space

    space = load_search_space("digits_pbt", digits_cfg)
    scheduler = build_scheduler(TuneOptions(space="digits_pbt", scheduler="pbt"), space, epochs=8)
    ints = [k for k, p in space.params.items() if p.distribution == "int"]
    # Start at the edges, where unclipped factors leave the space: floats and choices at their top, integers at 1.
    config = {k: (int(p.low) if p.distribution == "int" else p.bounds[1]) for k, p in space.params.items()}
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
            low, high = p.bounds
            assert low <= config[key] <= high, f"{key}={config[key]} left [{low}, {high}]"
            assert p.distribution != "choice" or config[key] in p.values, f"{key}={config[key]} is not a choice"
        for key in ints:
            assert isinstance(config[key], int)
            seen[key].add(config[key])
    assert all(len(values) >= 3 for values in seen.values()), seen  # small integers move, not only on resample


def test_relative_paths_are_made_absolute_in_the_driver(digits_cfg, tmp_path, monkeypatch):
    from cpsc_ray.config import with_values
    from cpsc_ray.runs.assembly import with_absolute_paths

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
    from cpsc_ray.cluster.metrics import tune_metrics
    from cpsc_ray.cluster.tune.driver import build_search
    from cpsc_ray.cluster.tune.search_space import load_search_space

    history = [{"epoch": 1, "val_acc": 0.4}, {"epoch": 2, "val_acc": 0.9}, {"epoch": 3, "val_acc": 0.6}]
    metrics = tune_metrics(history[-1], history, "val_acc", images_spent=10)
    assert (metrics["score"], metrics["best_score"]) == (0.6, 0.9)  # PBT compares now, Optuna the best
    space = load_search_space("digits_optuna", digits_cfg)
    search = build_search(TuneOptions(space="digits_optuna", search="optuna"), space, ("best_score", "max"), None)
    assert search.metric == "best_score"
    options = TuneOptions(space="digits_optuna", search="optuna", scheduler="asha", minimize_device_seconds=True)
    with pytest.raises(InputError, match="Pareto front"):
        run_tune(digits_cfg, options)
    # a cap on a synchronous population is refused, not silently dropped
    with pytest.raises(InputError, match="--max-concurrent with --scheduler pbt"):
        run_tune(digits_cfg, TuneOptions(space="digits_pbt", scheduler="pbt", max_concurrent=1))


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
    from cpsc_ray.results.lineage import Exploit
    from cpsc_ray.runs.assembly import prepare_engine
    from cpsc_ray.runs.exploit import record_exploit
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
    from cpsc_ray.results.tables import read_results

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
    with pytest.raises(InputError, match=r"--workers 4 .* asks for 4 worker\(s\) of 1 CPU, .* it has 2 CPU"):
        run_distributed(tiny_cfg, workers=4, cpus_per_worker=1)
    with pytest.raises(InputError, match=r"of 1 CPU, 1 GPU, .* 0 GPU \(largest node 0\)"):
        run_distributed(tiny_cfg, workers=1, gpus_per_worker=1)
    assert not runs.exists(), "a refused request writes nothing"
    options = TuneOptions(space="digits_pbt", workers_per_trial=2, cpus_per_worker=1, max_concurrent=2)
    at_once = r"--max-concurrent 2 asks for 2 worker\(s\) of 1 CPU plus 0.01 CPU for the trial itself x 2 trials"
    with pytest.raises(InputError, match=at_once):
        run_tune(tiny_cfg, options)
    with pytest.raises(InputError, match=r"2 worker\(s\) of 1.5 CPU.*\(largest node 2\)"):
        run_tune(tiny_cfg, TuneOptions(space="digits_pbt", workers_per_trial=2, cpus_per_worker=1.5))
    # Two 1-CPU workers fill the 2 CPUs, and the trial itself holds a sliver more: it would wait forever.
    with pytest.raises(InputError, match=r"2 worker\(s\) of 1 CPU plus 0.01 CPU for the trial itself"):
        run_tune(tiny_cfg, TuneOptions(space="digits_pbt", workers_per_trial=2, cpus_per_worker=1))


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
    from cpsc_ray.cluster.tune.search_space import load_search_space
    from cpsc_ray.config import with_values
    from cpsc_ray.results.schema import config_values
    from cpsc_ray.results.tables import read_results

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
    results = read_results([str(tmp_path / "runs")], experiments=["pbt"])
    lineage = results.lineage
    # The exploit at epoch 2 survives only if the experiment's last snapshot before the interruption names it (Ray
    # saves it asynchronously); the ones at 4 come after the resume, and one at the last epoch may come before or
    # after the trials end.
    assert 4 in set(lineage.epoch) and set(lineage.epoch) <= {2, 4, 6}, "exploits only where trials checkpoint"
    # Whichever way the snapshot fell, each trial's lineage is the path its state took: its epoch 3 ran under the
    # config of its epoch-2 clone if the lineage has one, else under its own.
    searched = load_search_space("digits_pbt").params
    for trial_id, rows in results.epochs.groupby("trial_id"):
        clones = lineage[(lineage.trial_id == trial_id) & (lineage.epoch == 2)]
        ran = config_values(rows[rows.epoch == 3].iloc[0].to_dict())
        if len(clones):
            expected = json.loads(clones.config_after.iloc[0])
        else:
            expected = config_values(rows[rows.epoch == 1].iloc[0].to_dict())
        assert {k: ran[k] for k in searched} == pytest.approx({k: expected[k] for k in searched}), trial_id


def test_a_user_error_on_the_teachers_worker_reaches_the_driver_in_one_line(ray_local, digits_cfg, tmp_path, capsys):
    missing = tmp_path / "no-teacher.safetensors"
    code = main(["distill", "--workers", "2", "--storage", str(tmp_path / "runs"), *TINY, f"teacher.weights={missing}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(missing) in err, err
    assert not (tmp_path / "runs").exists(), "nothing is written"
