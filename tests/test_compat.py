"""What runs and experiments wrote before the package was layered (10b9195) names the old module paths:
``cpsc_ray.models`` in teacher builders, student cards and the configs saved with runs and experiments, and
``cpsc_ray.tune`` in Tune's pickled experiment state. Each test writes files in the old format."""

from __future__ import annotations

import json
import pickle
import sys
import types
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from results_rows import epoch_row

from cpsc_ray.cli import main
from cpsc_ray.cluster.tune.record import ExperimentRecord
from cpsc_ray.compat import alias_moved_modules, check_restorable
from cpsc_ray.config import Config, TeacherConfig, load_config, validate_tree
from cpsc_ray.errors import InputError
from cpsc_ray.layout import RootDir, RunDir
from cpsc_ray.results.analysis import summarize
from cpsc_ray.results.lineage import read_lineage
from cpsc_ray.results.schema import LINEAGE_SCHEMA
from cpsc_ray.results.tables import publish, read_results
from cpsc_ray.runs.teacher import build_teacher_model
from cpsc_ray.storage import Storage

OLD_BUILDER = "cpsc_ray.models:build_model"
OLD_CARD_BUILDER = "cpsc_ray.models:build_model (or any CIFAR-style implementation of the same arch)"


@pytest.mark.parametrize(
    ("builder", "kwargs"),
    [
        (OLD_BUILDER, {"name": "digits_student", "num_classes": 10, "channels": 1}),
        ("cpsc_ray.models.digits:digits_student", {"num_classes": 10}),
        # What an old student card tells a user to build its arch with (card: arch, num_classes, channels, kwargs).
        (OLD_CARD_BUILDER.split()[0], {"name": "digits_student", "num_classes": 10, "channels": 1}),
    ],
    ids=["registry builder", "model family module", "old student card"],
)
def test_a_teacher_builder_naming_an_old_module_still_builds(builder, kwargs):
    model = build_teacher_model(TeacherConfig(builder=builder, kwargs=kwargs), 10, 1)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def _old_config() -> dict:
    return load_config(
        "digits",
        [
            f"teacher.builder={OLD_BUILDER}",
            "teacher.arch=null",
            "teacher.kwargs={name: digits_teacher, num_classes: 10, channels: 1}",
        ],
    ).model_dump()


def test_saved_configs_of_old_runs_and_experiments_still_build_their_teacher(tmp_path):
    """A run's config.yaml and checkpoint meta.json and an experiment's setup.json name modules only through
    teacher.builder."""
    root = Storage(str(tmp_path))
    root.write_text("old-run/config.yaml", yaml.safe_dump(_old_config()))
    root.write_json("old-run/checkpoints/last/meta.json", {"epoch": 3, "config": _old_config(), "wall_s": 1.0})
    root.write_json(
        "old-exp/cpsc/setup.json",
        {
            "base": _old_config(),
            "experiment": "old-exp",
            "method": "random+fifo",
            "metric": "val_acc",
            "trials": root.uri("old-exp", "cpsc", "trials"),
            "rounds": root.uri("old-exp", "cpsc", "rounds"),
            "workers": 1,
            "gpus_per_worker": 0.0,
            "cpus_per_worker": 1.0,
            "max_failures": 0,
            "checkpoint_every": 1,
            "keep_checkpoints": 3,
            "population_based": False,
            "searched_keys": ["loss.alpha"],
            "options": {"space": "digits_optuna"},
        },
    )
    saved = [
        validate_tree(yaml.safe_load(root.read_text("old-run/config.yaml")), "config.yaml"),
        Config.model_validate(root.read_json("old-run/checkpoints/last/meta.json")["config"]),
        Config.model_validate(ExperimentRecord.read(RootDir(root.uri()), "old-exp").base),
    ]
    for cfg in saved:
        assert cfg.teacher.builder == OLD_BUILDER
        assert build_teacher_model(cfg.teacher, 10, 1)(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def _state(protocol: int, old: bool, monkeypatch) -> bytes:
    """Tune state as Ray pickles it, holding our compute-budget stopper, from the old module or the current one."""
    if not old:
        from cpsc_ray.config import Config as current_class

        return pickle.dumps({"_run_config": {"stop": current_class}, "verbose": 1}, protocol=protocol)
    module = types.ModuleType("cpsc_ray.tune")

    class ComputeBudget:
        def __init__(self, images: int):
            self.images, self.spent = images, 0

    ComputeBudget.__module__, ComputeBudget.__qualname__ = "cpsc_ray.tune", "ComputeBudget"
    module.ComputeBudget = ComputeBudget
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "cpsc_ray.tune", module)
        stoppers = [ComputeBudget(10**6), ComputeBudget(10**5)]  # the second refers to the class through the memo
        return pickle.dumps({"_run_config": {"stop": stoppers}, "verbose": 1}, protocol=protocol)


def _write_experiment(root: Path, state: bytes) -> None:
    experiment = root / "old-exp"
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(state)
    (experiment / "search_gen_state-2025-01-01_00-00-00.json").write_bytes(state)  # a pickle despite its name
    (experiment / "experiment_state-2025-01-01_00-00-00.json").write_text(json.dumps({"trial_data": []}))
    (experiment / "tune_trial_00000").mkdir()


@pytest.mark.parametrize("protocol", [2, 5])
def test_tune_state_of_an_old_experiment_is_refused_in_one_line(tmp_path, monkeypatch, protocol):
    _write_experiment(tmp_path, _state(protocol, old=True, monkeypatch=monkeypatch))
    with pytest.raises(InputError, match=r"cpsc_ray\.tune\.ComputeBudget.*new --name") as refused:
        check_restorable(RootDir(str(tmp_path)), "old-exp")
    assert "\n" not in str(refused.value)


def test_tune_state_naming_current_modules_is_restorable(tmp_path, monkeypatch):
    _write_experiment(tmp_path, _state(5, old=False, monkeypatch=monkeypatch))
    check_restorable(RootDir(str(tmp_path)), "old-exp")
    check_restorable(RootDir(str(tmp_path)), "no-such-experiment")


def _state_before_the_tune_package(monkeypatch) -> bytes:
    """Tune state as a version before cluster/tune/ pickled a PBT experiment's: the scheduler's class and its explore
    function, a bound method of the search space, under cpsc_ray.cluster.schedulers and .search_space."""
    from cpsc_ray.cluster.tune import schedulers, search_space

    space = search_space.load_search_space("digits_pbt")
    with monkeypatch.context() as patch:
        for module, classes in ((search_space, ("SearchSpace", "Param")), (schedulers, ("AlignedPBT",))):
            old = module.__name__.replace("cluster.tune.", "cluster.")
            patch.setitem(sys.modules, old, module)
            for name in classes:
                patch.setattr(getattr(module, name), "__module__", old)
        return pickle.dumps({"scheduler": schedulers.AlignedPBT, "custom_explore_fn": space.clamp}, protocol=5)


def test_tune_state_from_before_the_tune_package_resumes(tmp_path, monkeypatch):
    state = _state_before_the_tune_package(monkeypatch)
    assert b"cpsc_ray.cluster.search_space" in state and b"cpsc_ray.cluster.tune.search_space" not in state
    _write_experiment(tmp_path, state)
    check_restorable(RootDir(str(tmp_path)), "old-exp")
    alias_moved_modules()
    restored = pickle.loads(state)
    assert restored["scheduler"].__name__ == "AlignedPBT"
    assert restored["custom_explore_fn"]({"loss.alpha": 1e9})["loss.alpha"] == 20.0  # the space's high bound


def test_tune_resume_of_an_old_experiment_says_what_to_do(tmp_path, monkeypatch, capsys):
    _write_experiment(tmp_path, _state(5, old=True, monkeypatch=monkeypatch))
    code = main(["tune", "--resume", "old-exp", "--storage", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("error: --resume:") and "cpsc_ray.tune" in err


def test_finalize_reruns_published_before_runs_recorded_their_source_are_matched_by_their_name(tmp_path):
    """Results of an earlier version have no source_experiment column: a rerun belongs to the experiment whose
    name its own extends (``<EXP>-final``, or ``<EXP>-final-<timestamp>`` when that was taken), if the method is
    the same; the latest rerun gives the accuracy."""
    root = RootDir(str(tmp_path))
    experiments = [
        ("search", "tune", "pbt", 0.5),
        ("search-final", "finalize", "pbt", 0.6),
        ("search-final-20260101-000000-000000", "finalize", "pbt", 0.7),
        ("search-final-x", "finalize", "random+fifo", 0.8),  # another method's: not this experiment's rerun
    ]
    for name, kind, method, accuracy in experiments:
        publish(root, name, [epoch_row(name, kind, method, accuracy)], [])
    for part in (tmp_path / "results").rglob("*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns([c for c in table.column_names if c == "source_experiment"]), part)
    results = read_results([str(tmp_path)])
    sources = results.trials.set_index("experiment").source_experiment
    assert sources["search-final"] == sources["search-final-20260101-000000-000000"] == "search"
    assert pd.isna(sources["search-final-x"]) and pd.isna(sources["search"])
    rows = {entry.row["experiment"]: entry.row for entry in summarize(results)}
    assert rows["search"]["final_experiment"] == "search-final-20260101-000000-000000"
    assert rows["search"]["test_mean"] == 0.7 and rows["search"]["runs"] == 3
    assert rows["search-final-x"]["kind"] == "finalize"  # shown on its own


def test_a_lineage_written_before_the_typed_record_reads_as_clones(tmp_path):
    """lineage.json as trials wrote it: one mapping per clone. It reads as Clone records, which give the lineage
    table's rows as the results hold them."""
    old = {
        "source_trial_id": "t_00001",
        "epoch": 2,
        "source_checkpoint": "/runs/exp/t_00001/checkpoint_000001",
        "config_before": {"loss.alpha": 1.0},
        "config_after": {"loss.alpha": 1.2},
        "state_digest": "ab12",
        "lr_student": 0.05,
        "lr_generator": 0.001,
        "loss_weights": {"generator": {"kd": -1.0}, "student": {"kd": 1.0}, "temperature": 0.07},
    }
    trial = RunDir(str(tmp_path / "t_00000"))
    (tmp_path / "t_00000").mkdir()
    (tmp_path / "t_00000/lineage.json").write_text(json.dumps([old]))
    (clone,) = read_lineage(trial)
    assert clone.source_checkpoint == old["source_checkpoint"] and clone.loss_weights == old["loss_weights"]
    row = clone.row("exp", "digits", "t_00000")
    assert set(row) == set(LINEAGE_SCHEMA.names)
    assert json.loads(row["config_after"]) == {"loss.alpha": 1.2} and row["epoch"] == 2


def test_an_experiment_record_from_before_train_restarts_had_their_name_reads_its_retries_as_them(tmp_path):
    """setup.json of an experiment from before issue 21 holds ``max_failures`` (Ray Train's restarts of a
    multi-worker trial then): it reads as ``max_restarts``, and the fields added since take their defaults."""
    from cpsc_ray.cluster.recovery import START_TIMEOUT_S

    old = {
        "base": {},
        "experiment": "old-exp",
        "method": "pbt",
        "metric": "val_acc",
        "trials": "t",
        "rounds": "r",
        "workers": 2,
        "gpus_per_worker": 0.0,
        "cpus_per_worker": 1.0,
        "max_failures": 2,
        "checkpoint_every": 1,
        "keep_checkpoints": 3,
        "population_based": True,
        "searched_keys": [],
        "options": {},
    }
    Storage(str(tmp_path)).write_json("old-exp/cpsc/setup.json", old)
    record = ExperimentRecord.read(RootDir(str(tmp_path)), "old-exp")
    assert record.recovery.max_restarts == 2 and record.start_timeout_s == START_TIMEOUT_S
    assert record.driver_resource is None
