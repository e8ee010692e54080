"""The CLI end to end on the digits default with tiny budgets: run directory, metrics, checkpoints,
model selection without the test set, resume, teacher training; what `config --show` and `models` list,
that `report` and `--help` load neither Ray nor torch, and the manners of the command line: every option
explained with its default, a version, warnings on stderr."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from cpsc_ray.cli import build_parser, main
from cpsc_ray.method.models import build_model
from cpsc_ray.results.schema import SCHEMA
from cpsc_ray.runs.run import DistillRun


def distill(tmp_path: Path, *extra: str) -> int:
    return main(["distill", "--name", "e2e", *TINY, f"output_dir={tmp_path / 'runs'}", *extra])


def test_distill_writes_a_complete_run_directory(digits_cfg, tmp_path, capsys):
    assert distill(tmp_path, "train.epochs=3") == 0
    out = capsys.readouterr().out
    assert "teacher test accuracy" in out and "student test accuracy" in out
    run = tmp_path / "runs" / "e2e"
    table = pq.read_table(run / "metrics.parquet")
    assert table.schema == SCHEMA
    rows = table.to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["test_acc"] <= 1 and 0 <= r["val_acc"] <= 1 and 0 <= r["proxy"] <= 1 for r in rows)
    assert rows[-1]["images"] == 3 * 2 * (2 + 2) * 32
    assert rows[0]["config/loss.alpha"] == 5.0 and rows[0]["method"] == "defaults"

    state = torch.load(run / "checkpoints/last/state.pt", weights_only=True)
    meta = json.loads((run / "checkpoints/last/meta.json").read_text())
    assert meta["epoch"] == 3 and set(state) >= {"student", "generator", "student_opt", "generator_opt"}

    summary = json.loads((run / "summary.json").read_text())
    best_epoch = max(rows, key=lambda r: r["val_acc"])["epoch"]  # first maximum, as the run keeps it
    assert summary["selected_by"] == {
        "metric": "val_acc",
        "value": max(r["val_acc"] for r in rows),
        "epoch": best_epoch,
    }
    assert summary["best"]["test_acc"] == rows[best_epoch - 1]["test_acc"]
    card = json.loads((run / "best/student.json").read_text())
    student = build_model(card["arch"], card["num_classes"], card["channels"])
    student.load_state_dict(load_file(run / "best/student.safetensors"))
    assert (run / "samples.png").read_bytes()[:4] == b"\x89PNG"

    # The run ends by pointing at its own report, built from the results it published.
    assert f"report: {run / 'report' / 'report.html'}" in out
    reported = pd.read_parquet(run / "report" / "summary.parquet")
    assert list(reported.experiment) == ["e2e"] and reported.n.iloc[0] == 1
    assert reported.test_mean.iloc[0] == pytest.approx(summary["best"]["test_acc"])


def test_without_validation_split_the_proxy_selects(digits_cfg, tmp_path):
    assert distill(tmp_path, "data.val_size=0") == 0
    summary = json.loads((tmp_path / "runs/e2e/summary.json").read_text())
    assert summary["selected_by"]["metric"] == "proxy"
    assert all(r["val_acc"] is None for r in pq.read_table(tmp_path / "runs/e2e/metrics.parquet").to_pylist())


def test_a_second_run_of_the_same_name_gets_a_new_directory(digits_cfg, tmp_path):
    assert distill(tmp_path, "train.epochs=1") == 0
    assert distill(tmp_path, "train.epochs=1") == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "results")
    assert len(runs) == 2 and runs[0] == "e2e" and runs[1].startswith("e2e-")
    from cpsc_ray.results.tables import read_results

    trials = read_results([str(tmp_path / "runs")]).trials
    assert sorted(trials["experiment"]) == runs and set(trials["kind"]) == {"distill"}


class Crash(Exception):
    pass


def test_resume_continues_from_the_last_checkpoint(digits_cfg, tmp_path, monkeypatch):
    assert main(["distill", "--name", "unbroken", *TINY, "train.epochs=4", f"output_dir={tmp_path / 'runs'}"]) == 0
    unbroken = pq.read_table(tmp_path / "runs/unbroken/metrics.parquet").to_pylist()

    real_run_epoch = DistillRun.run_epoch

    def crash_after_epoch_3(self):
        row = real_run_epoch(self)
        if row["epoch"] == 3:
            raise Crash()
        return row

    monkeypatch.setattr(DistillRun, "run_epoch", crash_after_epoch_3)
    with pytest.raises(Crash):
        distill(tmp_path, "train.epochs=4", "train.checkpoint_every=2")
    run = tmp_path / "runs/e2e"
    assert json.loads((run / "checkpoints/last/meta.json").read_text())["epoch"] == 2
    assert [r["epoch"] for r in pq.read_table(run / "metrics.parquet").to_pylist()] == [1, 2, 3]

    monkeypatch.setattr(DistillRun, "run_epoch", real_run_epoch)
    assert main(["distill", "--resume", "e2e", f"output_dir={tmp_path / 'runs'}"]) == 0
    resumed = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    for before, after in zip(unbroken, resumed):
        assert before["test_acc"] == after["test_acc"] and before["s_total"] == after["s_total"]


def test_teacher_command_writes_weights_and_card(tmp_path, capsys):
    assert main(["teacher", "--out", str(tmp_path / "t"), "teacher_training.epochs=1", "data.val_size=100"]) == 0
    card = json.loads((tmp_path / "t/teacher.json").read_text())
    assert card["arch"] == "digits_teacher" and card["num_classes"] == 10 and card["input_size"] == 16
    assert 0 < card["test_acc"] <= 1 and card["val_acc"] is not None
    weights = load_file(tmp_path / "t/teacher.safetensors")
    build_model("digits_teacher", 10, 1).load_state_dict(weights)

    # A job that may run again (the grid's) trains a teacher only where there is none yet.
    written = (tmp_path / "t/teacher.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["teacher", "--if-missing", "--out", str(tmp_path / "t"), "teacher_training.epochs=1"]) == 0
    assert capsys.readouterr().out.startswith(f"teacher already trained: {tmp_path / 't/teacher.safetensors'}")
    assert (tmp_path / "t/teacher.safetensors").stat().st_mtime_ns == written


def test_config_command_prints_overrides(capsys):
    assert main(["config", "loss.alpha=2.5"]) == 0
    assert "alpha: 2.5" in capsys.readouterr().out


def test_every_shipped_config_validates():
    from cpsc_ray.config import load_config, shipped_config_names

    names = shipped_config_names()
    assert "digits" in names and len(names) >= 7
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_an_in_process_run_needs_no_ray(tiny_cfg, tmp_path):
    """The GPU check runs where Ray is not installed: an in-process run must never import it."""
    code = (
        "import sys; sys.modules['ray'] = None\n"  # any `import ray` now raises ImportError
        "from cpsc_ray.config import Config\n"
        "from cpsc_ray.runs.in_process import run_in_process\n"
        "summary = run_in_process(Config.model_validate_json(sys.argv[1]), progress=False)\n"
        "print(summary['selected_by']['epoch'] is not None)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, tiny_cfg.model_copy(update={"name": "no-ray"}).model_dump_json()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "True"
    assert pq.read_table(tmp_path / "runs" / "no-ray" / "metrics.parquet").num_rows == 2


def test_models_lists_what_a_config_can_name_and_each_name_builds(tmp_path, capsys):
    from cpsc_ray.commands.config import choices
    from cpsc_ray.config import DataConfig, GeneratorConfig
    from cpsc_ray.data import dataset_info
    from cpsc_ray.errors import InputError
    from cpsc_ray.method.generators import build_generator
    from cpsc_ray.method.models import MODELS

    assert main(["models"]) == 0
    listed = {
        title: names.split()
        for title, names in re.findall(r"^(\w[\w ]*) \(.*\):\n  (.*)$", capsys.readouterr().out, re.M)
    }
    assert listed["models"] == MODELS.names() and {"resnet18", "digits_teacher", "wrn_40_2"} <= set(listed["models"])
    assert {"upsample", "dcgan"} <= set(listed["generators"]) and "digits" in listed["datasets"]
    # The registries list what the config's types accept, no more and no less.
    assert sorted(listed["generators"]) == sorted(choices(GeneratorConfig.model_fields["arch"]))
    assert sorted(listed["datasets"]) == sorted(choices(DataConfig.model_fields["dataset"]))
    assert sorted(listed["synthesizers"]) == sorted(choices(GeneratorConfig.model_fields["kind"]))
    for arch in listed["generators"]:
        for conditional in (True, False):
            assert build_generator(arch, 8, 4, channels=1, image_size=16, num_classes=10, conditional=conditional)
    for dataset in listed["datasets"]:  # each name reaches its loader: an error names the data, not the key
        with contextlib.suppress(InputError):
            dataset_info(DataConfig(dataset=dataset, root=str(tmp_path)))


def test_config_show_describes_every_field_with_its_default(capsys):
    from cpsc_ray.config import Config, flatten

    assert main(["config", "--show"]) == 0
    out = capsys.readouterr().out
    for key in flatten(Config()):
        assert re.search(rf"^{re.escape(key)}: .*\n    \S", out, re.M), f"{key}: no line with a description"
    assert "loss.alpha: 5.0  (float, >= 0)\n    IKD (L2 logit) weight\n" in out
    assert "loss.bn_form: standardized  (raw | standardized)\n" in out
    assert main(["config", "--show", "teacher.arch"]) == 0
    assert (
        capsys.readouterr().out == "teacher.arch: resnet34  (str | None)\n    registry model name (cpsc-ray models)\n"
    )


def test_an_unknown_key_points_to_the_show_command_that_lists_its_section(capsys):
    assert main(["config", "loss.alpah=2"]) == 2
    assert (
        "loss.alpah: unknown key (check its spelling against `cpsc-ray config --show loss`)" in capsys.readouterr().err
    )
    assert main(["config", "--show", "loss"]) == 0
    shown = capsys.readouterr().out
    assert "loss.alpha: " in shown and "train." not in shown
    assert main(["config", "--show", "los"]) == 2
    assert "no such field or section; sections: data, teacher" in capsys.readouterr().err


# The command line with Ray and torch refused at import: `report` and `--help` must not need them.
WITHOUT_RAY_OR_TORCH = """
import sys
sys.modules["ray"] = sys.modules["torch"] = None  # importing either now raises ImportError
from cpsc_ray.cli import build_parser, main
sys.exit(main(sys.argv[1:]))
"""


def test_report_and_help_load_neither_ray_nor_torch(digits_cfg, tmp_path):
    assert distill(tmp_path, "train.epochs=1") == 0

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", WITHOUT_RAY_OR_TORCH, *args], capture_output=True, text=True, timeout=300
        )

    done = cli("report", str(tmp_path / "runs"), "-o", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "report" / "report.html").is_file()
    for args in (["--help"], ["submit", "--help"], ["config", "--show", "loss"]):
        done = cli(*args)
        assert done.returncode == 0 and done.stdout, (args, done.stderr[-2000:])


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """The top-level parser and each command's, by name."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"cpsc-ray": parser, **commands.choices}


def test_every_option_of_every_command_has_help_that_shows_its_default(capsys):
    for name, parser in _parsers().items():
        with pytest.raises(SystemExit) as done:
            parser.parse_args(["--help"])
        page = capsys.readouterr().out
        assert done.value.code == 0 and "``" not in page, name  # plain text, no reStructuredText
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.dest}: no help"
            if action.default not in (None, [], argparse.SUPPRESS) and not isinstance(action.default, bool):
                shown = parser._get_formatter()._get_help_string(action)
                assert "default" in shown, f"{name} {action.dest}: default {action.default!r} not shown"
    assert "exit codes:" in _parsers()["cpsc-ray"].format_help()


def test_version_is_the_package_version(capsys):
    from cpsc_ray import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"cpsc-ray {__version__}\n"


def test_warnings_reach_stderr_with_a_prefix(capsys):
    import logging

    assert main(["models"]) == 0
    capsys.readouterr()
    logging.getLogger("cpsc_ray.commands.distill").warning("the report could not be built")
    captured = capsys.readouterr()
    assert captured.err == "warning: the report could not be built\n" and captured.out == ""


def test_name_and_resume_are_one_or_the_other(capsys):
    for command in ("distill", "tune"):
        with pytest.raises(SystemExit) as done:
            main([command, "--name", "a", "--resume", "b"])
        assert done.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_diverged_run_ends_in_one_line_with_exit_1_and_keeps_its_metrics(digits_cfg, tmp_path, capsys):
    code = distill(tmp_path, "student.lr=1e6", "student.warmup_fraction=0")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1, err
    assert err == (
        "error: a loss became NaN or infinite in epoch 1; the run's metrics so far are kept: "
        "lower student.lr, generator.lr or the loss weights"
    )
    assert pq.read_table(tmp_path / "runs/e2e/metrics.parquet").column("diverged").to_pylist() == [True]


def test_main_maps_each_kind_of_failure_to_its_exit_code(monkeypatch, capsys):
    """Commands raise; cli.main alone turns an input error into exit 2 and a failed run into exit 1."""
    from cpsc_ray.cluster.submit import JobFailed, JobUnknown, SubmitError
    from cpsc_ray.cluster.train import DistributedRunError
    from cpsc_ray.commands import config
    from cpsc_ray.errors import InputError, RunFailed
    from cpsc_ray.method.engine import DivergenceError
    from cpsc_ray.results.tables import NothingToCollect

    for error, code in [
        (InputError, 2),
        (SubmitError, 2),
        (RunFailed, 1),
        (DivergenceError, 1),
        (DistributedRunError, 1),
        (NothingToCollect, 1),
        (JobFailed, 1),
        (JobUnknown, 4),
    ]:

        def fail(args, error=error):
            raise error(f"{error.__name__} happened")

        monkeypatch.setattr(config, "cmd_models", fail)
        assert main(["models"]) == code, error
        assert capsys.readouterr().err == f"error: {error.__name__} happened\n"
