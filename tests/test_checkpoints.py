"""Checkpoints a lost node or process left half-written are skipped: every checkpoint's meta.json is written last
and names its files' sizes and digests, ``checkpoints/last`` keeps the one before it until it is whole, and
``--resume`` continues from the newest complete checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY
from test_cluster_scale import Crash, crash_after

from cpsc_ray.cli import main
from cpsc_ray.cluster.train import check_gpus_per_worker
from cpsc_ray.errors import InputError
from cpsc_ray.layout import CheckpointDir, RunDir
from cpsc_ray.runs.checkpoints import newest_checkpoint, read_checkpoint, with_manifest
from cpsc_ray.storage import Storage


def write_checkpoint(run: Path, name: str, epoch: int, state: bytes = b"engine state") -> Path:
    files = with_manifest({CheckpointDir.STATE: state}, {"epoch": epoch})
    for file, data in files.items():
        (run / name).mkdir(parents=True, exist_ok=True)
        (run / name / file).write_bytes(data)
    return run / name


def test_the_newest_complete_checkpoint_wins_and_a_half_written_one_is_named(tmp_path, caplog):
    run = tmp_path / "run"
    write_checkpoint(run, "checkpoint_2026-01-01_00-00-01.000001", epoch=1)
    write_checkpoint(run, "checkpoint_2026-01-01_00-00-02.000002", epoch=2)
    truncated = write_checkpoint(run, "checkpoint_2026-01-01_00-00-03.000003", epoch=3)
    (truncated / CheckpointDir.STATE).write_bytes(b"engine")  # the upload stopped part way
    unlisted = write_checkpoint(run, "checkpoint_2026-01-01_00-00-04.000004", epoch=4)
    (unlisted / CheckpointDir.META).unlink()  # its meta (the manifest) never arrived
    with caplog.at_level(logging.WARNING, logger="cpsc_ray"):
        assert newest_checkpoint(RunDir(str(run))) == "checkpoint_2026-01-01_00-00-02.000002"
    assert "checkpoint_2026-01-01_00-00-03.000003" in caplog.text and "incomplete" in caplog.text

    # Under Ray Train, a checkpoint Train never registered (written as its node was lost) is skipped too.
    registered = {"checkpoint_2026-01-01_00-00-01.000001"}
    assert newest_checkpoint(RunDir(str(run)), registered=registered) == "checkpoint_2026-01-01_00-00-01.000001"


def test_a_digest_that_does_not_match_is_refused_on_read(tmp_path):
    directory = write_checkpoint(tmp_path, "c", epoch=1, state=b"engine state")
    (directory / CheckpointDir.STATE).write_bytes(b"ENGINE STATE")  # same size, other bytes
    with pytest.raises(InputError, match=r"checkpoint .*/c: state.pt does not match its digest"):
        read_checkpoint(Storage(str(directory)))


def test_resume_continues_from_the_checkpoint_before_a_half_written_last(digits_cfg, tmp_path, monkeypatch, caplog):
    storage = str(tmp_path / "runs")
    run = tmp_path / "runs/half"
    crash_after(monkeypatch, 3)  # epochs 1 and 2 checkpointed; epoch 3 trained, its checkpoint never written
    with pytest.raises(Crash):
        main(
            ["distill", "--name", "half", *TINY, "train.epochs=3", "train.checkpoint_every=1", f"output_dir={storage}"]
        )
    monkeypatch.undo()
    assert json.loads((run / "checkpoints/last" / CheckpointDir.META).read_text())["epoch"] == 2
    assert json.loads((run / "checkpoints/previous" / CheckpointDir.META).read_text())["epoch"] == 1
    state = run / "checkpoints/last" / CheckpointDir.STATE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # the process died writing it

    with caplog.at_level(logging.WARNING, logger="cpsc_ray"):
        assert main(["distill", "--resume", "half", f"output_dir={storage}"]) == 0
    assert "checkpoints/last" in caplog.text and "incomplete" in caplog.text
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # Continued from epoch 1: epochs 2 and 3 ran again, and the work of their first runs is charged to epoch 2.
    assert rows[1]["lost_images"] == 2 * rows[0]["epoch_images"]
    assert read_checkpoint(Storage(str(run)), "checkpoints/last")[1]["epoch"] == 3


def test_a_worker_never_gets_more_than_one_gpu():
    check_gpus_per_worker(2, 1.0, "--workers 2 --gpus-per-worker 1")
    with pytest.raises(InputError, match=r"--workers 2 --gpus-per-worker 2 .* one GPU per worker .* idle"):
        check_gpus_per_worker(2, 2.0, "--workers 2 --gpus-per-worker 2")
    with pytest.raises(InputError, match=r"--gpus-per-trial 4 --workers-per-trial 1 .* one GPU per worker"):
        check_gpus_per_worker(1, 4.0, "--gpus-per-trial 4 --workers-per-trial 1")


def test_resume_or_start_starts_a_run_then_continues_it_under_its_one_name(digits_cfg, tmp_path, monkeypatch):
    """The same command three times, as a retried job runs it: it starts, then continues from the newest
    checkpoint, then (the run finished) trains nothing more."""
    storage = tmp_path / "runs"
    command = ["distill", "--resume-or-start", "job", *TINY, "train.epochs=4", "train.checkpoint_every=2"]
    command.append(f"output_dir={storage}")
    crash_after(monkeypatch, 3)
    with pytest.raises(Crash):
        main(command)
    monkeypatch.undo()
    first = pq.read_table(storage / "job/metrics.parquet").to_pylist()
    assert main(command) == 0
    rows = pq.read_table(storage / "job/metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == first[:2], "continued from epoch 2's checkpoint, not started over"
    assert main(command) == 0
    assert pq.read_table(storage / "job/metrics.parquet").to_pylist() == rows
    assert sorted(p.name for p in storage.iterdir()) == ["job", "results"]


def test_resume_or_start_starts_over_a_run_that_has_no_checkpoint(tmp_path, caplog):
    from cpsc_ray.results.schema import epoch_table
    from cpsc_ray.runs.checkpoints import CheckpointError, resume_point

    run = RunDir(str(tmp_path / "run"))
    run.write_parquet("metrics.parquet", epoch_table([{"epoch": 1}]))
    with pytest.raises(CheckpointError, match="no checkpoint to continue from"):
        resume_point(run, "run")
    with caplog.at_level(logging.WARNING, logger="cpsc_ray"):
        assert resume_point(run, "run", or_start=True) is None
    assert "starts over" in caplog.text
