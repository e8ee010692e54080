"""Does distillation work for the teacher a user brings? Teachers of five families, trained here on
digits (16 px, 1 channel), each distilled into the same ``digits_student`` with the shipped digits
defaults, over several seeds. Results land in a JSON as each run finishes, so the zoo can run over
several sittings: finished runs are skipped.

    python benchmarks/teacher_zoo.py --storage /tmp/zoo --json BENCH.json [--teachers ...] [--seeds 0 1 2]
    python benchmarks/teacher_zoo.py ... --label reference dynamics=reference train.epochs=8

Overrides after the options apply to every run (the ``--label`` names that variant in the JSON).
Teachers are trained once into ``<storage>/teachers/<name>/`` with the digits teacher recipe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # zoo_teachers, for teacher.builder

from cpsc_ray.config import load_config, with_values  # noqa: E402
from cpsc_ray.method.engine import DivergenceError  # noqa: E402
from cpsc_ray.runs.in_process import run_in_process  # noqa: E402
from cpsc_ray.runs.teacher import WEIGHTS_NAME, card_path, train_teacher  # noqa: E402

# name -> the teacher config fields that select it
TEACHERS = {
    "digits_cnn": {"teacher.arch": "digits_teacher"},
    "resnet18": {"teacher.arch": "resnet18"},
    "wrn_40_2": {"teacher.arch": "wrn_40_2"},
    "vgg11_bn": {"teacher.arch": "vgg11_bn"},
    "tv_resnet18": {
        "teacher.arch": None,
        "teacher.builder": "zoo_teachers:torchvision_resnet18",
        "teacher.feature_layer": "avgpool",
    },
}


def teacher_weights(name: str, storage: Path) -> Path:
    """The zoo teacher's weights, trained with the digits teacher recipe the first time."""
    target = storage / "teachers" / name / WEIGHTS_NAME
    if not target.is_file():
        cfg = with_values(load_config("digits"), TEACHERS[name])
        started = time.perf_counter()
        train_teacher(cfg, out=target.parent)
        print(f"teacher {name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return target


def run_cell(name: str, seed: int, storage: Path, label: str, overrides: list[str]) -> dict:
    weights = teacher_weights(name, storage)
    card = json.loads(card_path(weights).read_text())
    cfg = with_values(
        load_config("digits", overrides),
        {**TEACHERS[name], "teacher.weights": str(weights), "seed": seed, "output_dir": str(storage / "runs")},
    )
    cfg = cfg.model_copy(update={"name": f"{label}-{name}-s{seed}"})
    started = time.perf_counter()
    row = {"label": label, "teacher": name, "seed": seed, "teacher_test_acc": card["test_acc"], "diverged": False}
    try:
        summary = run_in_process(cfg, progress=False)
        row.update(
            selected_test_acc=(summary["best"] or {}).get("test_acc"),
            selected_epoch=summary["selected_by"]["epoch"],
            last_test_acc=summary["last"]["test_acc"],
            warnings=summary["warnings"],
        )
    except DivergenceError as err:
        row.update(diverged=True, error=str(err))
    row["wall_s"] = time.perf_counter() - started
    return row


def mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f} (n=1)"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f} (n={len(pct)})"


def table(rows: list[dict], label: str) -> str:
    lines = [
        "| teacher | teacher acc. | student, selected epoch | student, last epoch | diverged | warned | wall per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in TEACHERS:
        cells = [r for r in rows if r["teacher"] == name and r["label"] == label]
        if not cells:
            lines.append(f"| {name} | open | open | open | open | open | open |")
            continue
        done = [r for r in cells if not r["diverged"]]
        lines.append(
            f"| {name} | {100 * cells[0]['teacher_test_acc']:.2f} | "
            f"{mean_sd([r['selected_test_acc'] for r in done if r['selected_test_acc'] is not None])} | "
            f"{mean_sd([r['last_test_acc'] for r in done])} | {len(cells) - len(done)} of {len(cells)} | "
            f"{sum(bool(r.get('warnings')) for r in cells)} of {len(cells)} | "
            f"{statistics.mean(r['wall_s'] for r in cells) / 60:.1f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", type=Path, required=True, help="teachers and runs are written here")
    parser.add_argument("--json", type=Path, required=True, help="results, one entry per run (appended)")
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--label", default="defaults", help="names this variant's runs")
    parser.add_argument("--teachers-only", action="store_true", help="train the teachers, run nothing")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args()
    rows = json.loads(args.json.read_text()) if args.json.is_file() else []
    for name in args.teachers:
        teacher_weights(name, args.storage)
    if args.teachers_only:
        return
    for name in args.teachers:
        for seed in args.seeds:
            if any(r["teacher"] == name and r["seed"] == seed and r["label"] == args.label for r in rows):
                continue
            row = run_cell(name, seed, args.storage, args.label, args.overrides)
            # Re-read before writing: several sittings (or processes) may fill one JSON.
            rows = [*(json.loads(args.json.read_text()) if args.json.is_file() else []), row]
            args.json.write_text(json.dumps(rows, indent=1))
            print(json.dumps(row), flush=True)
    print(table(rows, args.label))


if __name__ == "__main__":
    main()
