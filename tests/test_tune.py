"""Ray Tune on the digits default with tiny budgets on the shared 2-CPU Ray instance: Optuna with
ASHA, PBT and PB2 that exploit and explore (single- and multi-worker trials), resume."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import assert_tensorboard_shows_what_each_trial_reported
from ray.tune import Callback, ExperimentAnalysis
from safetensors.torch import load_file

from cpsc_ray.cluster.tune import TuneOptions, run_tune
from cpsc_ray.config import with_values
from cpsc_ray.method.models import build_model
from cpsc_ray.method.schedules import multistep, warmup_cosine
from cpsc_ray.results.tables import NothingToCollect, read_results
from cpsc_ray.runs.checkpoints import read_checkpoint
from cpsc_ray.runs.exploit import state_digest
from cpsc_ray.storage import Storage

SPACES = Path(__file__).parent / "spaces"


def options(tmp_path, name: str, **kwargs) -> TuneOptions:
    return TuneOptions(storage=str(tmp_path / "runs"), name=name, **kwargs)


def test_optuna_with_asha_writes_what_the_trials_reported(ray_local, digits_cfg, tmp_path):
    cfg = with_values(digits_cfg, {"train.epochs": 3})
    summary = run_tune(
        cfg, options(tmp_path, "opt", space="digits_optuna", search="optuna", scheduler="asha", num_samples=4)
    )
    assert len(summary["trials"]) == 4 and not summary["errored"]
    results = read_results([str(tmp_path / "runs")], experiments=["opt"])
    assert set(results.epochs.method) == {"optuna+asha"} and set(results.epochs.kind) == {"tune"}
    assert {c for c in results.epochs.columns if c.startswith("config/")} >= {
        "config/loss.alpha",
        "config/data.val_size",
    }

    analysis = ExperimentAnalysis(str(tmp_path / "runs" / "opt"))
    reported = pd.concat(analysis.trial_dataframes.values(), ignore_index=True)
    assert len(reported) == len(results.epochs)  # early-stopped trials included, one row per epoch each
    merged = results.epochs.merge(reported, on=["trial_id", "epoch"], suffixes=("", "_reported"))
    assert len(merged) == len(results.epochs)
    for column in ("test_acc", "val_acc", "s_total", "images", "device_s"):
        assert (merged[column] - merged[f"{column}_reported"]).abs().max() < 1e-9, column
    healthy = ~merged["diverged"].astype(bool)
    assert (merged.loc[healthy, "score"] == merged.loc[healthy, "val_acc"]).all()
    assert (merged.loc[~healthy, "score"] == -1.0).all()
    # Each trial's sampled values are in its rows, so the schema holds whatever was searched.
    for trial_id, rows in results.epochs.groupby("trial_id"):
        config = analysis.get_all_configs()[next(p for p in analysis.get_all_configs() if trial_id in p)]
        assert math.isclose(rows["config/loss.alpha"].iloc[0], config["loss.alpha"])
    trials = results.trials.set_index("trial_id")
    assert (
        trials.images.sum()
        == results.epochs.epoch_images.sum()
        == results.epochs.groupby("trial_id").images.max().sum()
    )
    assert_tensorboard_shows_what_each_trial_reported(tmp_path / "runs", "opt")


def test_a_compute_budget_ends_the_experiment(ray_local, digits_cfg, tmp_path):
    cfg = with_values(digits_cfg, {"train.epochs": 2})
    per_trial = 2 * cfg.train.iterations_per_epoch * 12 * cfg.train.batch_size  # at most 6 G + 6 S steps
    summary = run_tune(
        cfg,
        options(tmp_path, "budget", space="digits_pbt", num_samples=30, max_concurrent=1, budget_images=2 * per_trial),
    )
    spent = read_results([str(tmp_path / "runs")], experiments=["budget"]).epochs.epoch_images.sum()
    # One trial at a time: the experiment ends right after the epoch that crosses the budget.
    assert 2 * per_trial <= spent < 2 * per_trial + per_trial // 2
    assert len(summary["trials"]) < 30


class Interrupted(Exception):
    pass


class InterruptAfter(Callback):
    """Stops the experiment once, at the start of a step after k trials have finished. (Tune stores
    callbacks with the experiment, so the restored copy finds the marker and lets the run go on.)"""

    def __init__(self, finished: int, marker):
        self.finished = finished
        self.marker = marker

    def on_step_begin(self, iteration, trials, **info):
        if sum(t.status == "TERMINATED" for t in trials) >= self.finished and not self.marker.exists():
            self.marker.write_text("interrupted")
            raise Interrupted()


def test_an_interrupted_experiment_resumes_without_repeating_finished_trials(
    ray_local, digits_cfg, tmp_path, monkeypatch
):
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")
    cfg = with_values(digits_cfg, {"train.epochs": 2})
    opts = options(tmp_path, "resumable", space="digits_pbt", num_samples=4, max_concurrent=1)
    with pytest.raises(Interrupted):
        run_tune(cfg, opts, callbacks=[InterruptAfter(2, tmp_path / "interrupted")])
    trials_dir = tmp_path / "runs/resumable/cpsc/trials"
    finished = {
        p.name: p.joinpath("metrics.parquet").stat().st_mtime_ns
        for p in trials_dir.iterdir()
        if len(pd.read_parquet(p / "metrics.parquet")) == 2
    }
    assert len(finished) >= 2
    summary = run_tune(cfg, opts, resume=True)
    assert not summary["errored"]
    assert len(summary["trials"]) == 4 and all(t["epochs"] == 2 for t in summary["trials"])
    for trial_id, mtime in finished.items():
        assert (trials_dir / trial_id / "metrics.parquet").stat().st_mtime_ns == mtime, trial_id


class BreakOnce(Callback):
    """Overwrites a file as the experiment starts (once: a restored experiment runs its callbacks again)."""

    def __init__(self, target: Path, marker: Path):
        self.target, self.marker = target, marker

    def setup(self, **info):
        if not self.marker.exists():
            self.marker.write_text("broken")
            self.target.write_bytes(b"not a teacher")


def test_an_experiment_whose_trials_all_fail_says_which_and_resumes_once_fixed(ray_local, digits_cfg, tmp_path):
    teacher = Path(digits_cfg.teacher.weights)
    copy = tmp_path / "teacher" / teacher.name
    copy.parent.mkdir()
    shutil.copy(teacher, copy)  # without its card: read from the file alone
    cfg = with_values(digits_cfg, {"train.epochs": 1, "teacher.weights": str(copy)})
    opts = options(tmp_path, "broken", space=str(SPACES / "calm_pbt.yaml"), num_samples=2)
    with pytest.raises(NothingToCollect, match="no trial finished an epoch; nothing to collect: 2 trial") as failed:
        run_tune(cfg, opts, callbacks=[BreakOnce(copy, tmp_path / "broken-once")])
    message = str(failed.value)
    assert message.endswith(f"`cpsc-ray tune --resume broken --storage {tmp_path / 'runs'}` reruns them")
    errors = [Path(path, "error.txt").read_text() for path in re.findall(r"(/\S+): \w+", message)]
    assert len(errors) == 2 and all(str(copy) in error for error in errors), message

    shutil.copy(teacher, copy)
    summary = run_tune(cfg, opts, resume=True)
    assert not summary["errored"] and [t["epochs"] for t in summary["trials"]] == [1, 1]


def check_exploits(root: str, experiment: str, epochs: int, every_exploit_explores: bool = True) -> pd.DataFrame:
    """PB2 keeps the source's config until it has seen a reward change (its first perturbation), PBT
    always perturbs (or resamples) every mutation key."""
    results = read_results([root], experiments=[experiment])
    explored = []
    lineage = results.lineage
    assert len(lineage) >= 1, "PBT never exploited"
    for record in lineage.itertuples():
        # Right after the restore the trial held exactly the source's checkpointed state...
        state, meta = read_checkpoint(Storage(record.source_checkpoint))
        assert meta["identity"]["trial_id"] == record.source_trial_id and meta["epoch"] == record.epoch
        assert state_digest(state) == record.state_digest
        # ...and ran with its own (perturbed) hyperparameters, not the restored optimizer's.
        after = json.loads(record.config_after)
        progress = record.epoch / epochs
        assert math.isclose(
            record.lr_student, after["student.lr"] * warmup_cosine(progress, after["student.warmup_fraction"])
        )
        assert math.isclose(
            record.lr_generator,
            after["generator.lr"] * multistep(progress, after["generator.lr_milestones"], after["generator.lr_gamma"]),
        )
        weights = json.loads(record.loss_weights)
        student = {"kd": 1.0, "ikd": after["loss.alpha"], "ce": after["loss.eta_student"]}
        assert weights["student"] == {term: w for term, w in student.items() if w != 0}  # a weight of 0: term left out
        assert weights["generator"]["bn"] == after["loss.beta"] and weights["generator"]["scl"] == after["loss.gamma"]
        assert weights["generator"].get("ce", 0.0) == after["loss.eta"]  # eta's grid reaches 0: the term left out
        assert weights["temperature"] == after["loss.temperature"]
        source_rows = results.epochs[
            (results.epochs.trial_id == record.source_trial_id) & (results.epochs.epoch == record.epoch)
        ]
        mutated = (
            "loss.alpha",
            "loss.beta",
            "loss.gamma",
            "loss.eta",
            "loss.temperature",
            "student.lr",
            "generator.lr",
        )
        explored.append(any(after[k] != source_rows[f"config/{k}"].iloc[0] for k in mutated))
    assert all(explored) if every_exploit_explores else any(explored), f"explore changed nothing: {explored}"
    return results


class ProcessesSeen(Callback):
    """The process each trial report came from."""

    def __init__(self):
        self.pids: list[int] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.pids.append(result["pid"])


@dataclass
class Experiment:
    root: Path
    pids: list[int]  # the process of every report


@pytest.fixture(scope="module")
def pbt_experiment(ray_local, digits_cfg, tmp_path_factory) -> Experiment:
    """One PBT experiment (4 trials, 3 epochs) shared by the PBT and finalize tests."""
    root = tmp_path_factory.mktemp("pbt") / "runs"
    cfg = with_values(digits_cfg, {"train.epochs": 3})
    seen = ProcessesSeen()
    summary = run_tune(
        cfg,
        TuneOptions(
            space=str(SPACES / "calm_pbt.yaml"),
            scheduler="pbt",
            num_samples=4,
            keep_checkpoints=None,
            search_seed=1,
            storage=str(root),
            name="pbt",
        ),
        callbacks=[seen],
    )
    assert not summary["errored"]
    return Experiment(root, seen.pids)


def test_pbt_exploits_and_explores(pbt_experiment):
    results = check_exploits(str(pbt_experiment.root), "pbt", epochs=3)
    assert_one_row_per_trained_epoch(results.epochs, total=3)


def test_a_population_reuses_its_trial_processes(pbt_experiment):
    # Every trial pauses at every epoch's boundary; two run at a time. Started afresh, each of the 12 reports
    # would come from a process of its own.
    assert len(pbt_experiment.pids) == 4 * 3 and len(set(pbt_experiment.pids)) <= 6, pbt_experiment.pids


def test_pb2_exploits_and_explores(ray_local, digits_cfg, tmp_path):
    cfg = with_values(digits_cfg, {"train.epochs": 3})
    summary = run_tune(
        cfg,
        options(
            tmp_path, "pb2", space="digits_pbt", scheduler="pb2", num_samples=4, keep_checkpoints=None, search_seed=1
        ),
    )
    assert not summary["errored"]
    results = check_exploits(str(tmp_path / "runs"), "pb2", epochs=3, every_exploit_explores=False)
    assert_one_row_per_trained_epoch(results.epochs, total=3)


def test_an_exploit_is_in_the_next_experiment_snapshot():
    """Ray's exploit swaps the trial's checkpoint under a cached snapshot: an experiment saved before the
    clone reports again would resume the trial from its own state, under the clone's hyperparameters."""
    from types import SimpleNamespace

    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint
    from ray.tune.experiment import Trial
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    from cpsc_ray.cluster.tune.schedulers import AlignedPBT  # PB2 exploits through the same method

    population = AlignedPBT(
        time_attr="epoch", metric="score", mode="max", perturbation_interval=2, synch=True,
        hyperparam_mutations={"lr": [0.1, 0.2]}, log_config=False,
    )  # fmt: skip
    controller = SimpleNamespace(search_alg=None)
    worse, better = (Trial("tune_trial", config={"lr": 0.1}, stub=True) for _ in range(2))
    for trial, score in ((worse, 0.1), (better, 0.9)):
        population.on_trial_add(controller, trial)
        trial.status = Trial.PAUSED
        checkpoint = Checkpoint(f"/checkpoints/{score}")
        trial.run_metadata.checkpoint_manager.register_checkpoint(_TrainingResult(checkpoint, {"epoch": 2}))
        state = population._trial_state[trial]
        state.last_checkpoint, state.last_score, state.last_result = checkpoint, score, {"epoch": 2, "score": score}
    worse.get_json_state()  # the snapshot Tune saved before the exploit
    population._exploit(controller, worse, better)
    saved = _TrainingRunMetadata.from_json_state(worse.get_json_state()[1])
    assert saved.checkpoint_manager.latest_checkpoint_result.checkpoint.path == "/checkpoints/0.9"


def test_a_trial_that_goes_on_from_an_older_state_forgets_the_clones_made_after_it(tmp_path):
    """A driver that died before its snapshot named a clone resumes the trial from its own checkpoint: the clone
    it had recorded is no longer the path its state took, and a replay must not follow it."""
    from cpsc_ray.layout import RunDir
    from cpsc_ray.results.lineage import Clone, append_clone, forget_clones_after, read_lineage

    def clone(epoch: int, source: str) -> Clone:
        return Clone(f"t_{source}", epoch, f"/ckpt/{source}/{epoch}", None, {}, "digest", 0.1, 0.01, {})

    trial = RunDir(str(tmp_path / "t_00003"))
    append_clone(trial, clone(2, "00002"))
    append_clone(trial, clone(4, "00000"))
    forget_clones_after(trial, 4, "/ckpt/00000/4")  # restarted from the clone itself (a paused trial): kept
    assert [c.epoch for c in read_lineage(trial)] == [2, 4]
    forget_clones_after(trial, 4, "/ckpt/00003/4")  # from its own state at 4: the clone at 4 was forgotten
    assert [c.source_checkpoint for c in read_lineage(trial)] == ["/ckpt/00002/2"]
    forget_clones_after(trial, 2, "/ckpt/00003/2")  # from its own state at 2, older than every clone
    assert read_lineage(trial) == [] and trial.exists(RunDir.LINEAGE)


def test_finalize_replays_the_winners_schedule_over_seeds_and_exports_it(pbt_experiment):
    from cpsc_ray.cluster.finalize import finalize

    result = finalize("pbt", seeds=2, storage=str(pbt_experiment.root))
    tuned = read_results([str(pbt_experiment.root)], experiments=["pbt"])
    winner = tuned.trials.loc[tuned.trials[~tuned.trials.diverged].score.idxmax()]
    assert result["winner"] == winner.trial_id
    # The schedule ends with the winner's own final config and starts at epoch 1.
    schedule = result["schedule"]
    assert schedule[0][0] == 1 and schedule[-1][1]["loss.alpha"] == winner["config/loss.alpha"]
    final = read_results([str(pbt_experiment.root)], experiments=[result["final"]])
    assert set(final.epochs.trial_id) == {"seed0", "seed1"} and set(final.epochs.kind) == {"finalize"}
    assert set(final.epochs.method) == {"pbt"} and final.epochs.seed.nunique() == 2
    for _, rows in final.epochs.groupby("trial_id"):
        assert sorted(rows.epoch) == [1, 2, 3]
        for _, row in rows.iterrows():
            in_effect = [values for start, values in schedule if start <= row.epoch][-1]
            assert math.isclose(row["config/loss.alpha"], in_effect["loss.alpha"])
            assert math.isclose(row["config/student.lr"], in_effect["student.lr"])
    assert result["diverged"] == 0 and len(result["test_at_best"]) == 2 and 0 <= result["test_mean"] <= 1

    student_dir = result["students"][0]
    card = json.loads(open(f"{student_dir}/student.json").read())
    images = torch.randn(3, card["channels"], card["input_size"], card["input_size"])
    model = build_model(card["arch"], card["num_classes"], card["channels"]).eval()
    model.load_state_dict(load_file(f"{student_dir}/student.safetensors"))
    exported = torch.export.load(f"{student_dir}/student.pt2").module()
    assert torch.allclose(exported(images), model(images), atol=1e-5)


def test_finalize_run_again_continues_its_seeds_under_its_one_name(pbt_experiment):
    """``finalize --resume-or-start``, as the grid runs it again: the seeds' reruns continue where they stopped
    (here: finished, so nothing trains) under ``<experiment>-final``, never a suffixed copy."""
    from cpsc_ray.cluster.finalize import finalize

    before = {p.name for p in pbt_experiment.root.iterdir()}
    first = finalize("pbt", seeds=2, storage=str(pbt_experiment.root), resume_or_start=True)
    again = finalize("pbt", seeds=2, storage=str(pbt_experiment.root), resume_or_start=True)
    assert first["final"] == again["final"] == "pbt-final"
    assert {p.name for p in pbt_experiment.root.iterdir()} - before <= {"pbt-final"}
    assert again["test_at_best"] == first["test_at_best"]
    final = read_results([str(pbt_experiment.root)], experiments=["pbt-final"])
    assert {seed: sorted(rows.epoch) for seed, rows in final.epochs.groupby("trial_id")} == {
        "seed0": [1, 2, 3],
        "seed1": [1, 2, 3],
    }


def assert_one_row_per_trained_epoch(epochs: pd.DataFrame, total: int) -> None:
    """A trial's rows continue from a cloned epoch: no epoch twice, and a gap only after an epoch it
    diverged in (it trains no more until PBT clones a better trial into it)."""
    for trial_id, rows in epochs.groupby("trial_id"):
        rows = rows.sort_values("epoch")
        seen = list(rows.epoch)
        assert seen[0] == 1 and len(set(seen)) == len(seen), (trial_id, seen)
        for before, after in zip(seen, seen[1:]):
            assert after == before + 1 or rows[rows.epoch == before].diverged.iloc[0], (trial_id, seen)
        assert seen[-1] == total or rows.diverged.iloc[-1], (trial_id, seen)
