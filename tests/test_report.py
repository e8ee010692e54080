"""``cpsc-ray report`` on real results of two datasets (digits at 16 and at 8 pixels): distill runs
at the paper's weights (two seeds) and at other weights, and a PBT experiment with a finalize rerun
(reported with and without it). The tables are checked against numbers recomputed here from the
Parquet rows; bad inputs must fail with one line naming the path and exit code 2."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY
from PIL import Image

from cpsc_ray.cli import main
from cpsc_ray.cluster.finalize import finalize
from cpsc_ray.cluster.tune import TuneOptions, run_tune
from cpsc_ray.config import load_config, with_values
from cpsc_ray.layout import RootDir
from cpsc_ray.results import plots
from cpsc_ray.results.replay import clones
from cpsc_ray.results.report import build_report
from cpsc_ray.results.schema import LOSS_METRICS, epoch_table
from cpsc_ray.results.tables import ResultsError, read_results, run_name
from cpsc_ray.runs.in_process import run_in_process
from cpsc_ray.runs.teacher import ensure_teacher

CALM = str(Path(__file__).parent / "spaces" / "calm_pbt.yaml")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def storage(ray_local, digits_cfg, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("report") / "runs"
    digits = digits_cfg.model_copy(update={"output_dir": str(root)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two busy cores spin more than they compute
    try:
        small = ensure_teacher(load_config("digits", [*TINY, "data.image_size=8", f"output_dir={root}"]), False)
        for seed in (0, 1):
            run_in_process(with_values(digits, {"seed": seed, "name": f"paper-{seed}"}), progress=False)
        run_in_process(with_values(digits, {"loss.alpha": 2.0, "name": "alpha2"}), progress=False)
        run_in_process(with_values(small, {"name": "paper-8px"}), progress=False)
    finally:
        torch.set_num_threads(threads)
    pbt = TuneOptions(
        space=CALM, scheduler="pbt", num_samples=4, keep_checkpoints=None, search_seed=1, storage=str(root), name="pbt8"
    )
    run_tune(small, pbt)
    return {"root": root, "final": finalize("pbt8", 2, str(root))}


@pytest.fixture(scope="module")
def built(storage, tmp_path_factory) -> dict:
    """The report of the fixture's results, and every matplotlib figure it drew (to check what they plot)."""
    out = tmp_path_factory.mktemp("report-out")
    figures = []
    draw = plots._png
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "_png", lambda fig: figures.append(fig) or draw(fig))
        assert main(["report", str(storage["root"]), "-o", str(out)]) == 0
    return {"out": out, "figures": figures}


@pytest.fixture(scope="module")
def report(built) -> Path:
    return built["out"]


def expected(results, experiments: list[str], units: list[str] | None = None) -> dict:
    """The numbers a row must show, recomputed from the Parquet rows: accuracy over ``units`` (the
    experiments whose non-diverged trials it rests on; default: all), compute over every epoch row
    (with the set-up and lost epochs charged to it)."""
    trials = results.trials[results.trials.experiment.isin(units or experiments)]
    trials = trials[~trials.diverged.astype(bool)]
    epochs = results.epochs[results.epochs.experiment.isin(experiments)]
    test = list(trials.test_at_best)
    return {
        "n": len(trials),
        "test_mean": statistics.mean(test),
        "test_std": statistics.stdev(test) if len(test) > 1 else None,
        "val_mean": statistics.mean(trials.best_val_acc),
        "last_test_mean": statistics.mean(trials.last_test_acc),
        "device_s": float((epochs.epoch_s * epochs.workers + epochs.overhead_s.fillna(0)).sum()),
        "images": int((epochs.epoch_images + epochs.lost_images.fillna(0)).sum()),
        "runs": int(epochs.groupby(["experiment", "trial_id"]).ngroups),
    }


def check_row(row: pd.Series, want: dict) -> None:
    for key, value in want.items():
        if value is None:
            assert pd.isna(row[key]), key
        else:
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_a_finalize_rerun_records_the_experiment_it_reran(storage):
    trials = read_results([str(storage["root"])]).trials
    sources = trials.groupby("kind").source_experiment.agg(lambda column: set(column.dropna()))
    assert sources.to_dict() == {"distill": set(), "tune": set(), "finalize": {"pbt8"}}
    assert storage["final"]["final"] == "pbt8-final"


def test_the_tables_hold_what_the_parquet_rows_hold(storage, report):
    results = read_results([str(storage["root"])])
    summary = pd.read_parquet(report / "summary.parquet")
    assert set(zip(summary.dataset, summary.method)) == {
        ("digits", "defaults"),
        ("digits", "manual"),
        ("digits-8px", "defaults"),
        ("digits-8px", "pbt"),
    }
    assert len(summary) == 4 and set(summary.compute_unit) == {"CPU"}
    row = lambda dataset, method: summary[(summary.dataset == dataset) & (summary.method == method)].iloc[0]  # noqa: E731

    paper = row("digits", "defaults")
    assert paper.experiment == "paper-0, paper-1" and paper.kind == "distill" and pd.isna(paper.trials)
    check_row(paper, expected(results, ["paper-0", "paper-1"]))
    check_row(row("digits", "manual"), expected(results, ["alpha2"]))
    check_row(row("digits-8px", "defaults"), expected(results, ["paper-8px"]))

    # The search's row: accuracy over the finalize seeds, compute over every trial and every seed.
    pbt = row("digits-8px", "pbt")
    assert pbt.final_experiment == storage["final"]["final"] == "pbt8-final" and not pbt.single_run
    assert pbt.selected_trial == storage["final"]["winner"] and pbt.trials == 4
    check_row(pbt, expected(results, ["pbt8", "pbt8-final"], units=["pbt8-final"]))
    assert pbt.test_mean == pytest.approx(storage["final"]["test_mean"])
    assert pbt.search_device_s == pytest.approx(expected(results, ["pbt8"])["device_s"])

    cross = pd.read_parquet(report / "cross_dataset.parquet")
    assert set(zip(cross.dataset, cross.method)) == {
        ("digits", "defaults"),
        ("digits-8px", "defaults"),
        ("digits-8px", "pbt"),
    }
    markdown = (report / "report.md").read_text()
    for dataset in ("digits", "digits-8px"):
        teacher = results.epochs[results.epochs.dataset == dataset].teacher_test_acc.iloc[0]
        assert (
            f"## {dataset}: digits_teacher → digits_student\n\nTeacher test accuracy: {100 * teacher:.2f}" in markdown
        )
    table = cross_table(markdown, ["dataset", "teacher → student", "defaults", "pbt"])  # no column for manual
    assert table["digits"]["pbt"] == ""  # no runs: empty
    want = expected(results, ["paper-0", "paper-1"])
    assert table["digits"]["defaults"] == (
        f"{100 * want['test_mean']:.2f} ± {100 * want['test_std']:.2f} (n=2) · {want['device_s'] / 3600:.3g} CPU-h"
    )
    want = expected(results, ["pbt8", "pbt8-final"], units=["pbt8-final"])
    assert table["digits-8px"]["pbt"].startswith(f"{100 * want['test_mean']:.2f} ± {100 * want['test_std']:.2f} (n=2)")


def test_without_its_rerun_a_search_reports_its_selected_trial_as_a_single_run(storage, tmp_path):
    assert main(["report", str(storage["root"]), "-o", str(tmp_path), "--experiments", "pbt8", "paper-8px"]) == 0
    results = read_results([str(storage["root"])], experiments=["pbt8"])
    trials = results.trials[~results.trials.diverged.astype(bool)]
    winner = trials.loc[trials.score.idxmax()]  # best validation accuracy, never test accuracy
    pbt = pd.read_parquet(tmp_path / "summary.parquet").set_index("method").loc["pbt"]
    assert pbt.single_run and pbt.n == 1 and pbt.selected_trial == winner.trial_id and pd.isna(pbt.final_experiment)
    assert pbt.test_mean == pytest.approx(winner.test_at_best) and pd.isna(pbt.test_std)
    assert pbt.device_s == pytest.approx(expected(results, ["pbt8"])["device_s"])  # every trial, stopped or not
    table = cross_table((tmp_path / "report.md").read_text(), ["dataset", "teacher → student", "defaults", "pbt"])
    assert table["digits-8px"]["pbt"].startswith(f"{100 * winner.test_at_best:.2f} (n=1†) · ")


def cross_table(markdown: str, columns: list[str]) -> dict[str, dict[str, str]]:
    """The cross-dataset table of a report.md, by dataset and column; checks its header."""
    lines = [
        line
        for line in markdown.splitlines()
        if line.startswith("| dataset |") or re.match(r"\| digits(-8px)? \| digits_teacher", line)
    ]
    cells = [
        [re.sub(r"^\[(.*)\]\(#[^)]*\)$", r"\1", c.strip()) for c in line.strip().strip("|").split("|")]
        for line in lines
    ]
    assert cells[0] == columns
    return {row[0]: dict(zip(columns, row)) for row in cells[1:]}


def images_of(page: str) -> list[tuple[str, bytes]]:
    """Each <img> of a page: its alt text and its decoded data-URI bytes."""
    found = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([^']*)'>", page)
    assert len(found) == page.count("<img "), "an image without alt text or not a data-URI PNG"
    return [(alt, base64.b64decode(data)) for alt, data in found]


def test_the_html_is_self_contained_and_holds_the_plots(storage, report):
    page = (report / "report.html").read_text()
    images = images_of(page)
    # Per pair: accuracy against compute and loss-weight sensitivity; per row: accuracy per epoch, loss
    # terms and the samples of each run shown (distill runs; PBT's selected trial and its 2 rerun seeds);
    # for PBT also the selected trial's hyperparameter schedule.
    assert len(images) == (2 + (2 + 2) + (2 + 1)) + (2 + (2 + 1) + (2 + 3 + 1))
    for alt, png in images:
        assert png.startswith(PNG) and alt
        with Image.open(io.BytesIO(png)) as image:
            image.load()  # decodes the whole image
            assert min(image.size) > 100, alt
    assert not re.search(r"<(link|script)\b|src='http", page)
    for caption in (
        "accuracy against compute",
        "accuracy per epoch",
        "loss-weight sensitivity",
        "loss terms per epoch of paper-0, paper-1",
        "loss terms per epoch of pbt8/",
        "synthetic images of paper-0 after its last epoch (2), one row per class",
        "synthetic images of pbt8-final/seed1",
        "pbt8, hyperparameter schedule of the selected trial",
    ):
        assert caption in page, caption
    assert len(list((report / "plots").glob("*.png"))) == len(images)
    # Every row of the tables links to its run's section.
    targets = re.findall(r"<a href='#([^']+)'>", page)
    assert len(targets) == 4 + 3  # the pair tables' rows, the cross table's non-empty cells
    assert all(f"<h3 id='{target}'>" in page for target in targets)


def test_the_sample_grids_show_every_class_upscaled(storage, report):
    """Every run that ran to its last epoch wrote its grid, tuning trials included; the report shows
    those of the distill runs and of the selected runs, one row per class at 64 px or more per image."""
    results = read_results([str(storage["root"])])
    root = RootDir(str(storage["root"]))
    finished = results.trials[~results.trials.diverged.astype(bool) & (results.trials.epochs == 2)]
    assert set(finished.kind) == {"distill", "tune", "finalize"}
    for trial in finished.itertuples():
        grid = root.run_of(trial.kind, trial.experiment, trial.trial_id).read_bytes("samples.png")
        with Image.open(io.BytesIO(grid)) as image:
            assert image.size[1] >= 10 * plots.TILE_PX  # digits: 10 classes, one row each
    page = (report / "report.html").read_text()
    shown = [(alt, png) for alt, png in images_of(page) if "synthetic images of" in alt]
    assert len(shown) == 2 + 1 + 1 + 3
    pbt = storage["final"]["winner"]
    run = root.run_of("tune", "pbt8", pbt)
    assert (f"synthetic images of pbt8/{pbt} after its last epoch (2)", run.read_bytes("samples.png")) in [
        (alt.split(": ", 1)[1].split(", one row")[0], png) for alt, png in shown
    ]


def is_percent_axis(ax) -> bool:
    return type(ax.yaxis.get_major_formatter()).__name__ == "PercentFormatter"


def test_the_plots_fit_their_data_and_hold_the_parquet_rows(storage, built):
    results = read_results([str(storage["root"])])
    figures = built["figures"]
    loss_figures = 0
    for fig in figures:
        title = fig._suptitle.get_text() if fig._suptitle else ""
        assert title, "a plot without a title"
        for ax in (a for a in fig.axes if a.get_visible()):
            assert ax.get_xlabel() and ax.get_ylabel(), f"{title}: an unlabelled axis"
            if is_percent_axis(ax):
                low, high = ax.get_ylim()
                assert 0.0 <= low < high <= 1.0, f"{title}: accuracy axis {low}..{high}"
        if "loss terms per epoch" not in title:
            continue
        loss_figures += 1
        lines = [line for ax in fig.axes for line in ax.get_lines() if line.get_gid()]
        assert {line.get_gid().split(":")[1] for line in lines} <= set(LOSS_METRICS)
        assert {"g_total", "s_total", "g_bn", "s_kd"} <= {line.get_gid().split(":")[1] for line in lines}
        for line in lines:
            run, column = line.get_gid().split(":")
            epochs = results.epochs
            names = pd.Series(
                [run_name(*r) for r in epochs[["kind", "experiment", "trial_id"]].itertuples(index=False)]
            )
            rows = epochs[names.to_numpy() == run].sort_values("epoch")
            assert list(line.get_xdata()) == list(rows.epoch), line.get_gid()
            assert list(line.get_ydata()) == pytest.approx(list(rows[column]), nan_ok=True), line.get_gid()
    assert loss_figures == 4


def test_the_accuracy_axis_of_a_single_point_stays_within_100_percent(monkeypatch):
    figures = []
    draw = plots._png
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or draw(fig))
    point = pd.DataFrame({"experiment": ["x"], "trial_id": ["run"], "epoch": [1], "val_acc": [0.98], "test_acc": [1.0]})
    plots.accuracy_per_epoch(point.iloc[0:0], point, None, "one point")
    for ax in figures[0].axes:
        assert 0.0 <= ax.get_ylim()[0] and ax.get_ylim()[1] <= 1.0


# Injected into a copy of the page: after the load, every image must have decoded (a non-zero natural
# width); the result goes into the DOM that --dump-dom prints.
CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter((img) => !img.complete || img.naturalWidth === 0).map((img) => img.alt);
  document.body.setAttribute("data-checked", JSON.stringify({images: images.length, broken}));
});
</script>"""


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    not browser() and not os.environ.get("CI"), reason="no chromium to load the report in (CI installs it)"
)
def test_a_browser_shows_every_image_without_console_errors(report, tmp_path):
    assert browser(), "CI is set but no chromium was found: .ci/run installs it with apt-get"
    page = (report / "report.html").read_text()
    checked = tmp_path / "report.html"
    checked.write_text(page.replace("</body>", CHECK_IMAGES + "</body>"))
    done = subprocess.run(
        [browser(), "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0"]
        + ["--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"data-checked=\"([^\"]*)\"", done.stdout)
    assert found, done.stderr[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result == {"images": len(images_of(page)), "broken": []}
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]  # the page logs nothing itself
    assert not console, console


def test_the_schedule_follows_the_lineage(storage):
    results = read_results([str(storage["root"])], experiments=["pbt8"])
    assert not results.lineage.empty, "PBT never exploited"
    for record in results.lineage.itertuples():
        chain = clones(results.lineage, record.trial_id, record.epoch + 1)
        assert chain[-1] == (record.epoch, record.source_trial_id)
        assert [epoch for epoch, _ in chain] == sorted(epoch for epoch, _ in chain)


# With Ray and torch refused at import: every module of the results layer, then the report of the
# fixture's results. (The rows still name the torch that computed them: the runs had it loaded.)
WITHOUT_RAY_OR_TORCH = """
import importlib, pkgutil, sys
sys.modules["ray"] = sys.modules["torch"] = None  # importing either now raises ImportError
import cpsc_ray.results
for module in pkgutil.walk_packages(cpsc_ray.results.__path__, "cpsc_ray.results."):
    importlib.import_module(module.name)
from cpsc_ray.results.report import build_report
build_report([sys.argv[1]], sys.argv[2])
"""


def test_the_results_layer_needs_neither_ray_nor_torch(storage, report, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY_OR_TORCH, str(storage["root"]), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert set(read_results([str(storage["root"])]).epochs.torch_version) == {torch.__version__}
    for name in ("report.md", "report.html", "summary.parquet", "cross_dataset.parquet"):
        assert (tmp_path / name).read_bytes() == (report / name).read_bytes(), name


def test_a_path_without_results_is_refused(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other" / "data.parquet")
    for location in (tmp_path / "missing", tmp_path / "other"):
        with pytest.raises(ResultsError, match="no cpsc-ray results here"):
            build_report([str(location)], tmp_path / "out")
        assert main(["report", str(location), "-o", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: {location}: no cpsc-ray results here") and error.count("\n") == 1
    (tmp_path / "empty" / "results" / "epochs").mkdir(parents=True)
    assert main(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
    assert "no runs in these results" in capsys.readouterr().err


def test_parquet_of_another_schema_is_refused(tmp_path, capsys):
    part = tmp_path / "results" / "epochs" / "dataset=digits" / "experiment=x"
    part.mkdir(parents=True)
    pq.write_table(pa.table({"epoch": [1], "accuracy": [0.5]}), part / "part-0.parquet")
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"{part}/part-0.parquet: not a cpsc-ray epochs table" in error and error.count("\n") == 1

    (part / "part-0.parquet").write_bytes(b"not parquet at all")
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"error: {tmp_path}: cannot read its results Parquet" in error and error.count("\n") == 1


def test_an_experiment_in_two_locations_is_refused_and_one_location_twice_is_read_once(storage, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(storage["root"] / "results", copy / "results")
    with pytest.raises(ResultsError, match="is under both"):
        build_report([str(storage["root"]), str(copy)], tmp_path / "out")
    build_report([str(storage["root"]), str(storage["root"]) + "/"], tmp_path / "twice")
    build_report([str(storage["root"])], tmp_path / "once")
    twice, once = (pd.read_parquet(tmp_path / d / "summary.parquet") for d in ("twice", "once"))
    pd.testing.assert_frame_equal(twice, once)
    assert main(["report", str(copy), "-o", str(tmp_path / "some"), "--experiments", "paper-8px"]) == 0
    assert list(pd.read_parquet(tmp_path / "some" / "summary.parquet").experiment) == ["paper-8px"]


def test_tables_of_an_earlier_version_read_with_the_new_columns_empty(tmp_path):
    # An epochs table written before issue 9: no health metrics, no dynamics keys.
    added = ["teacher_pseudo_acc", "class_coverage", "config/dynamics", "config/loss.ce_on", "g_grad_bn"]
    row = {"experiment": "old", "dataset": "digits", "trial_id": "run", "epoch": 1, "val_acc": 0.5, "test_acc": 0.4}
    table = epoch_table([row])
    part = tmp_path / "results" / "epochs" / "dataset=digits" / "experiment=old"
    part.mkdir(parents=True)
    pq.write_table(table.drop_columns(added + ["dataset", "experiment"]), part / "part-0.parquet")
    epochs = read_results([str(tmp_path)]).epochs
    assert list(epochs.val_acc) == [0.5] and list(epochs.experiment) == ["old"]
    assert epochs[added].isna().all().all()
