"""Does distillation work for the teacher a user brings? Teachers of several families and two training
recipes on digits (16 px, 1 channel), and a deep teacher on a 100-class 32 px RGB set (``glyphs.py``),
each distilled with the shipped digits defaults over several seeds.

    python benchmarks/teacher_zoo.py --storage /tmp/zoo --json BENCH.json [--teachers ...] [--seeds 0 1 2]
    python benchmarks/teacher_zoo.py ... --label no-scl loss.gamma=0 train.epochs=8

Overrides after the options apply to every run; ``--label`` names that variant in the tables. Each row
records what makes it reproducible and comparable: the resolved config's hash (with the teacher named by
its weights' digest, not its path), the commit, the seed, validation and test accuracy at the epoch
validation chose, at the epoch the data-free proxy would have chosen, and at the last epoch, the
teacher's agreement with the pseudo-labels over the last quarter of the run, divergence and warnings.
A finished cell is reused only when teacher, seed and config hash all match (never by label alone; the hash an
earlier version of this script wrote counts where the options added since are off), so rows measured under
older defaults are run again; a cell whose run was interrupted (the process killed)
continues from its newest checkpoint when started again, its wall time summed over the attempts. Rows
land in the JSON as each run finishes, under a file lock, so several processes can fill one JSON.

Teachers are trained once into ``<storage>/teachers/<name>/``: the digits teacher recipe (30 epochs,
batch 64, lr 0.05), or that recipe with label smoothing 0.1 (``*_ls``).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # zoo_teachers and glyphs

import glyphs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from cpsc_ray.config import Config, load_config, with_values  # noqa: E402
from cpsc_ray.errors import InputError  # noqa: E402
from cpsc_ray.layout import RootDir, RunDir  # noqa: E402
from cpsc_ray.method.engine import DivergenceError  # noqa: E402
from cpsc_ray.runs.assembly import written_config  # noqa: E402
from cpsc_ray.runs.in_process import run_in_process  # noqa: E402
from cpsc_ray.runs.teacher import WEIGHTS_NAME, card_path, train_teacher  # noqa: E402

LABEL_SMOOTHING = {"teacher_training.label_smoothing": 0.1}
TV_RESNET18 = {"teacher.arch": None, "teacher.builder": "zoo_teachers:torchvision_resnet18"}
TV_MOBILENET = {"teacher.arch": None, "teacher.builder": "zoo_teachers:torchvision_mobilenet_v2"}
# The many-class row: 100 glyph classes at 32 px RGB (glyphs.py), a 40-layer WRN teacher, the reference's
# WRN-40-2 -> WRN-16-2 pair, the digits budget at twice the batch (about 2.6 images per class per batch).
GLYPHS = {
    "data.dataset": "imagefolder",
    "data.image_size": 32,
    "teacher.arch": "wrn_40_2",
    "student.arch": "wrn_16_2",
    "train.batch_size": 256,
}

# name -> the config fields that select the teacher (its family and recipe, and its data)
TEACHERS: dict[str, dict] = {
    "digits_cnn": {"teacher.arch": "digits_teacher"},
    "resnet18": {"teacher.arch": "resnet18"},
    "wrn_40_2": {"teacher.arch": "wrn_40_2"},
    "vgg11_bn": {"teacher.arch": "vgg11_bn"},
    "tv_resnet18": TV_RESNET18,
    "tv_mobilenet_v2": TV_MOBILENET,
    "resnet18_ls": {"teacher.arch": "resnet18", **LABEL_SMOOTHING},
    "tv_resnet18_ls": {**TV_RESNET18, **LABEL_SMOOTHING},
    "glyphs_wrn_40_2": GLYPHS,
}


def base_config(name: str, storage: Path, overrides: list[str] = ()) -> Config:
    """The shipped digits defaults with the teacher's fields (and, for the glyphs row, its data) set."""
    fields = dict(TEACHERS[name])
    if fields.get("data.dataset") == "imagefolder":
        fields["data.root"] = str(glyph_data(storage))
    return with_values(load_config("digits", overrides), fields)


def glyph_data(storage: Path) -> Path:
    root = storage / "glyphs100"
    if not (root / "test").is_dir():
        glyphs.write(root, {"train": 100, "test": 30}, seed=0)
    return root


def teacher_weights(name: str, storage: Path) -> Path:
    """The zoo teacher's weights, trained with its recipe the first time."""
    target = storage / "teachers" / name / WEIGHTS_NAME
    if not target.is_file():
        started = time.perf_counter()
        train_teacher(base_config(name, storage), out=target.parent)
        print(f"teacher {name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return target


def commit() -> str:
    here = Path(__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "../cpsc_ray"], cwd=here, capture_output=True)
    return head + ("-dirty" if dirty.stdout.strip() else "")


def config_hash(cfg: Config, weights: Path) -> str:
    """What decides a run's numbers: the resolved config without its name and location, the teacher named
    by the digest of its weights."""
    return config_hashes(cfg, weights)[0]


# Options added to the config since the zoo's first rows, oldest first: the keys each commit added and the test
# that they are at the value computing what the code computed before they existed.
ADDED_OPTIONS = (
    ("ae9cf8a", (("train", "compile_mode"),), lambda tree: tree["train"]["compile_mode"] == "default"),
    (
        "cc93c24",
        (("student", "replay_images"), ("student", "replay_fraction")),
        lambda tree: tree["student"]["replay_images"] == 0,
    ),
    ("973a872", (("loss", "contrast_instances"),), lambda tree: not tree["loss"]["contrast_instances"]),
    (
        "77b59cc",
        (("loss", "agreement_target"), ("loss", "agreement_rate")),
        lambda tree: tree["loss"]["agreement_target"] == 0,
    ),
)


def config_hashes(cfg: Config, weights: Path) -> list[str]:
    """``config_hash`` as this script writes it today, then as earlier versions wrote it for a run that computes the
    same: with the options added since each version removed while they are off. A finished cell stays reusable
    across a commit that only adds an option, instead of the whole zoo running again."""

    def digest(tree: dict) -> str:
        return hashlib.sha256(yaml.safe_dump(tree, sort_keys=True).encode()).hexdigest()[:16]

    tree = cfg.model_dump(exclude={"name", "output_dir"})
    tree["teacher"]["weights"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    tree["data"].pop("root")
    hashes = [digest(tree)]
    for _, keys, is_off in reversed(ADDED_OPTIONS):
        if not is_off(tree):
            break
        for section, key in keys:
            del tree[section][key]
        hashes.append(digest(tree))
    return hashes


def run_config(name: str, seed: int, storage: Path, label: str, overrides: list[str]) -> Config:
    cfg = with_values(
        base_config(name, storage, overrides),
        {"teacher.weights": str(teacher_weights(name, storage)), "seed": seed, "output_dir": str(storage / "runs")},
    )
    return cfg.model_copy(update={"name": f"{label}-{name}-s{seed}"})


def at_epoch(rows: list[dict], metric: str) -> dict:
    """The evaluated row with the highest ``metric`` (earliest on ties), as model selection picks it."""
    evaluated = [r for r in rows if r.get(metric) is not None]
    return max(evaluated, key=lambda r: (r[metric], -r["epoch"])) if evaluated else {}


def outcome(run_dir: Path, epochs: int) -> dict:
    """Accuracies at the selected, proxy-selected and last epochs, and the pseudo-label agreement."""
    rows = sorted(pq.read_table(run_dir / "metrics.parquet").to_pylist(), key=lambda r: r["epoch"])
    by_val, by_proxy, last = at_epoch(rows, "val_acc"), at_epoch(rows, "proxy"), rows[-1]
    last_quarter = [r["teacher_pseudo_acc"] for r in rows if r["epoch"] > 0.75 * epochs]
    return {
        "epochs_run": last["epoch"],
        "selected_epoch": by_val.get("epoch"),
        "selected_val_acc": by_val.get("val_acc"),
        "selected_test_acc": by_val.get("test_acc"),
        "proxy_epoch": by_proxy.get("epoch"),
        "proxy_test_acc": by_proxy.get("test_acc"),
        "last_val_acc": last.get("val_acc"),
        "last_test_acc": last.get("test_acc"),
        "pseudo_acc_last_quarter": statistics.mean(last_quarter) if last_quarter else None,
        "pseudo_acc_by_epoch": [round(r["teacher_pseudo_acc"], 4) for r in rows],
    }


def run_cell(
    name: str, seed: int, storage: Path, label: str, overrides: list[str], commit_id: str | None = None
) -> dict:
    """One run; ``commit_id`` names the commit where the checkout is a copy without git (a lent GPU machine)."""
    cfg = run_config(name, seed, storage, label, overrides)
    weights = Path(cfg.teacher.weights)
    card = json.loads(card_path(weights).read_text())
    row = {
        "label": label,
        "teacher": name,
        "seed": seed,
        "config_hash": config_hash(cfg, weights),
        "commit": commit_id or commit(),
        "overrides": overrides,
        "teacher_test_acc": card["test_acc"],
        "teacher_val_acc": card["val_acc"],
        "diverged": False,
    }
    wall_before = interrupted_wall(cfg, row["config_hash"], weights)
    if wall_before is not None:
        row["resumed"] = True
    started = time.perf_counter()
    try:
        summary = run_in_process(
            cfg, resume=cfg.name if wall_before is not None else None, progress=False, or_start=True
        )
        row.update(outcome(Path(summary["run_dir"]), cfg.train.epochs), warnings=summary["warnings"])
    except DivergenceError as err:
        row.update(diverged=True, error=str(err), warnings=[])
    row["wall_s"] = (wall_before or 0.0) + time.perf_counter() - started
    return row


def interrupted_wall(cfg: Config, cfg_hash: str, weights: Path) -> float | None:
    """The wall seconds already spent by an earlier, interrupted run of this cell (same name, same config
    hash ``cfg_hash``), which ``run_cell`` then continues from its newest checkpoint; None when there is none
    to continue (a run of that name under another config stays as it is, and this one starts under a new name;
    so does one whose config this version no longer reads, such as a key since removed)."""
    earlier = RootDir(cfg.output_dir).run(cfg.name)
    if not earlier.exists(RunDir.CONFIG):
        return None
    try:
        written = written_config(earlier)
    except InputError:
        return None
    if config_hash(written, weights) != cfg_hash:
        return None
    rows = earlier.metric_rows()
    return max((r["wall_s"] for r in rows), default=0.0)


@contextmanager
def locked(path: Path):
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def append_row(path: Path, row: dict) -> None:
    with locked(path):
        path.write_text(json.dumps([*read_rows(path), row], indent=1))


def pct(values: list[float]) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def table(rows: list[dict], labels: list[str]) -> str:
    """One line per teacher, variant, commit and teacher weights (known by their test accuracy): a label run
    again on other code, or with a teacher trained again, gets its own line. (Each row's config hash also
    covers its seed, so seeds do not pool by it.)"""
    lines = [
        "| teacher | variant | commit | teacher test | val., selected | test, selected | test, last | "
        "test, proxy's pick | agreement, last quarter | diverged | warned | seeds | wall per run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in TEACHERS:
        for label in labels:
            cells = [r for r in rows if r["teacher"] == name and r["label"] == label]
            for key in dict.fromkeys(map(pooled, cells)):
                lines.append(table_line([r for r in cells if pooled(r) == key]))
    return "\n".join(lines)


def pooled(row: dict) -> tuple:
    return row["commit"], json.dumps(row["overrides"]), row["teacher_test_acc"]


def table_line(cells: list[dict]) -> str:
    done = [r for r in cells if not r["diverged"]]
    one = cells[0]
    return (
        f"| {one['teacher']} | {one['label']} | {one['commit'][:7]} | {100 * one['teacher_test_acc']:.2f} | "
        f"{pct([r['selected_val_acc'] for r in done])} | {pct([r['selected_test_acc'] for r in done])} | "
        f"{pct([r['last_test_acc'] for r in done])} | {pct([r['proxy_test_acc'] for r in done])} | "
        f"{pct([r['pseudo_acc_last_quarter'] for r in done])} | {len(cells) - len(done)} of {len(cells)} | "
        f"{sum(bool(r['warnings']) for r in cells)} of {len(cells)} | {' '.join(str(r['seed']) for r in cells)} | "
        f"{statistics.mean(r['wall_s'] for r in cells) / 60:.1f} min |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", type=Path, required=True, help="teachers, data and runs are written here")
    parser.add_argument("--json", type=Path, required=True, help="results, one entry per run (appended)")
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--label", default="defaults", help="names this variant's runs")
    parser.add_argument("--commit", help="the commit run, where this checkout is a copy without git")
    parser.add_argument("--teachers-only", action="store_true", help="train the teachers, run nothing")
    parser.add_argument("--table", action="store_true", help="print the labels' table from the JSON, run nothing")
    parser.add_argument("--labels", nargs="+", help="with --table: the variants to show (default: --label)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args()
    if not args.table:
        for name in args.teachers:
            teacher_weights(name, args.storage)
    if args.teachers_only or args.table:
        print(table(read_rows(args.json), args.labels or [args.label]) if args.table else "", end="")
        return
    for name in args.teachers:
        for seed in args.seeds:
            cfg = run_config(name, seed, args.storage, args.label, args.overrides)
            hashes = config_hashes(cfg, Path(cfg.teacher.weights))
            if any(
                (r["teacher"], r["seed"]) == (name, seed) and r["config_hash"] in hashes for r in read_rows(args.json)
            ):
                continue
            row = run_cell(name, seed, args.storage, args.label, args.overrides, args.commit)
            append_row(args.json, row)
            print(json.dumps({k: v for k, v in row.items() if k != "pseudo_acc_by_epoch"}), flush=True)
    print(table(read_rows(args.json), [args.label]))


if __name__ == "__main__":
    main()
