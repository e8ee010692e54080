"""One module owns the layout on disk (STYLE.md): ``cpsc_ray.layout`` names every file and folder of a run and an
experiment, those names are the ones earlier versions wrote, and a finalize rerun says which experiment it reran
instead of leaving it to be guessed from its name."""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd
from results_rows import epoch_row

from cpsc_ray.layout import CheckpointDir, ExperimentDir, ResultsDir, RootDir, RunDir
from cpsc_ray.results.analysis import summarize
from cpsc_ray.results.tables import publish, read_results

PACKAGE = Path(__file__).resolve().parents[1] / "cpsc_ray"


def _file_names() -> set[str]:
    """The layout's names that cannot be mistaken for a word of prose or a dict key: those with a dot or a slash."""
    names = {
        value for cls in (RunDir, ExperimentDir, CheckpointDir) for key, value in vars(cls).items() if key.isupper()
    }
    names |= set(RunDir.BEST_FILES)
    return {n for n in names if isinstance(n, str) and ("." in n or "/" in n)} | {"/dataset=", "part-0"}


def _strings_outside_docstrings(path: Path) -> list[ast.Constant]:
    tree = ast.parse(path.read_text())
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree) if isinstance(node, documented) and ast.get_docstring(node)
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_module_but_the_layout_spells_a_file_or_folder_of_a_run_or_an_experiment():
    names = _file_names()
    spelled = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "layout.py"
        for node in _strings_outside_docstrings(path)
        if any(name in node.value for name in names)
    ]
    assert not spelled, "ask cpsc_ray.layout for these names:\n" + "\n".join(spelled)


def test_the_layout_names_what_earlier_versions_wrote(tmp_path):
    """Old run and experiment directories read as they are: the names are pinned here, spelled out."""
    root = RootDir(str(tmp_path))
    run = root.run("quickstart")
    assert Path(run.path(RunDir.METRICS)) == tmp_path / "quickstart/metrics.parquet"
    names = [
        (RunDir.CONFIG, "config.yaml"),
        (RunDir.SUMMARY, "summary.json"),
        (RunDir.SAMPLES, "samples.png"),
        (RunDir.TENSORBOARD, "tensorboard"),
        (RunDir.LAST_CHECKPOINT, "checkpoints/last"),
        (RunDir.BEST_WEIGHTS, "best/student.safetensors"),
        (RunDir.BEST_CARD, "best/student.json"),
        (RunDir.BEST_PROGRAM, "best/student.pt2"),
        (RunDir.TRIAL_CONFIG, "config.json"),
        (RunDir.LINEAGE, "lineage.json"),
        (CheckpointDir.STATE, "state.pt"),
        (CheckpointDir.META, "meta.json"),
        (CheckpointDir.POINTER, "pointer.json"),
        (ExperimentDir.FINALIZE, "finalize.json"),
    ]
    assert [ours for ours, _ in names] == [written for _, written in names]
    experiment = root.experiment("search")
    assert Path(experiment.path(ExperimentDir.RECORD)) == tmp_path / "search/cpsc/setup.json"
    assert Path(experiment.trial("t_00001").path()) == tmp_path / "search/cpsc/trials/t_00001"
    assert Path(experiment.path(ExperimentDir.ROUNDS)) == tmp_path / "search/cpsc/rounds"
    assert Path(root.experiment("search-final").seed_run("seed0").path()) == tmp_path / "search-final/seed0"
    assert Path(root.results().path(ResultsDir.part("epochs", "digits", "search"))) == (
        tmp_path / "results/epochs/dataset=digits/experiment=search/part-0.parquet"
    )
    assert [Path(root.run_of(kind, "search", "t_00001").path()) for kind in ("distill", "tune", "finalize")] == [
        tmp_path / "search",
        tmp_path / "search/cpsc/trials/t_00001",
        tmp_path / "search/t_00001",
    ]


def test_a_new_name_never_takes_a_directory_that_exists(tmp_path):
    root = RootDir(str(tmp_path))
    assert root.free_name("run") == "run"
    (tmp_path / "run").mkdir()
    assert root.free_name("run").startswith("run-") and root.free_name("run") != "run"


def test_a_finalize_rerun_belongs_to_the_experiment_it_recorded_whatever_its_name(tmp_path):
    root = RootDir(str(tmp_path))
    publish(root, "search", [epoch_row("search", "tune", "pbt", 0.5)], [])
    publish(
        root, "rerun-of-choice", [epoch_row("rerun-of-choice", "finalize", "pbt", 0.7, source_experiment="search")], []
    )
    results = read_results([str(tmp_path)])
    (row,) = [entry.row for entry in summarize(results) if entry.row["kind"] == "tune"]
    assert row["experiment"] == "search" and row["final_experiment"] == "rerun-of-choice"
    assert row["test_mean"] == 0.7
    assert pd.isna(results.trials.set_index("experiment").source_experiment["search"])
