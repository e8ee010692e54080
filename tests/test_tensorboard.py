"""Runs are visible while they run: a distillation's rank 0 writes every epoch's metrics as TensorBoard
scalars into its run directory. Ray Tune's trials and multi-worker runs are checked where they already
run (tests/test_tune.py, tests/test_cluster_scale.py, tests/test_distributed.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import tensorboard_scalars

from cpsc_ray.layout import RunDir
from cpsc_ray.method.metric_names import LOSS_METRICS
from cpsc_ray.results.schema import EVAL_METRICS
from cpsc_ray.runs.in_process import run_in_process
from cpsc_ray.runs.tensorboard import EpochScalars, scalars_of
from cpsc_ray.storage import Storage


def test_an_in_process_run_writes_every_metric_of_every_epoch(tiny_cfg):
    run_in_process(tiny_cfg.model_copy(update={"name": "watched"}), progress=False)
    run = Path(tiny_cfg.output_dir) / "watched"
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    scalars = tensorboard_scalars(run / RunDir.TENSORBOARD)
    assert set(scalars) >= {*LOSS_METRICS, *EVAL_METRICS, "class_coverage", "lr_student", "images_per_s"}
    for row in rows:  # TINY evaluates every epoch: accuracies included
        for name, value in scalars_of(row).items():
            assert scalars[name][row["epoch"]] == pytest.approx(value, rel=1e-6), (name, row["epoch"])
    assert all(set(points) == {1, 2} for points in scalars.values())


def test_epochs_a_restart_lost_show_once_with_their_rerun_values(tmp_path):
    outputs = Storage(str(tmp_path))
    first_start = EpochScalars(outputs)
    for epoch in (1, 2, 3):
        first_start.write({"epoch": epoch, "s_total": float(epoch)})
    first_start.close()  # its process ended
    time.sleep(1.1)  # event files are named by the second they were opened in: a restart takes longer
    restart = EpochScalars(outputs)  # from the checkpoint at epoch 2: epoch 3 runs again
    for epoch in (3, 4):
        restart.write({"epoch": epoch, "s_total": 10.0 * epoch})
    restart.close()
    assert tensorboard_scalars(tmp_path / RunDir.TENSORBOARD)["s_total"] == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}


def test_tuning_trials_other_ranks_and_remote_runs_write_none(tmp_path):
    assert EpochScalars.for_run(Storage(str(tmp_path)), "tune") is None
    assert EpochScalars.for_run(None, "distill") is None
    assert EpochScalars.for_run(Storage("mock://bucket/runs"), "distill") is None
    assert EpochScalars.for_run(Storage(str(tmp_path)), "finalize") is not None
