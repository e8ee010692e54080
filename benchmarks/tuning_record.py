"""One tuning experiment and its ``finalize`` as one JSON: the rows behind a tuning table in BENCHMARKS.md.

Every trial and every finalize seed is a row with its config hash (``teacher_zoo.config_hash``: the resolved
config, a PBT trial's as it ended; the teacher named by its weights' digest), seed, validation and test accuracy
at the selected, the proxy-selected and the last epoch, and the teacher's agreement with the pseudo-labels, as
``teacher_zoo.outcome`` reads them for the zoo's rows.

    python benchmarks/tuning_record.py --storage /work/tune --experiment r18-optuna8 \\
        --command "cpsc-ray tune ...; cpsc-ray finalize ..." --what "..." --out tuning.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from teacher_zoo import commit, config_hash, outcome  # noqa: E402

from cpsc_ray.config import Config, load_config, with_values  # noqa: E402


def row(cfg: Config, run_dir: Path, epochs: int) -> dict:
    return {"seed": cfg.seed, "config_hash": config_hash(cfg, Path(cfg.teacher.weights)), **outcome(run_dir, epochs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", required=True, help="the tune command's --storage")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--final", help="finalize's run name (default: EXPERIMENT-final)")
    parser.add_argument("--what", required=True, help="what the experiment is, for the reader")
    parser.add_argument("--command", required=True, help="the commands that made it")
    parser.add_argument("--commit", help="the commit it ran at (default: this checkout's)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    storage = Path(args.storage)
    cpsc = storage / args.experiment / "cpsc"
    epochs = json.loads((cpsc / "setup.json").read_text())["base"]["train"]["epochs"]
    trials = []
    for trial in sorted(p for p in (cpsc / "trials").iterdir() if (p / "metrics.parquet").exists()):
        flat = json.loads((trial / "config.json").read_text())
        lineage = json.loads((trial / "lineage.json").read_text()) if (trial / "lineage.json").exists() else []
        trials.append(
            {
                "trial": trial.name,
                **row(with_values(Config(), flat), trial, epochs),
                "clones": [{"epoch": c["epoch"], "from": c["source_trial_id"]} for c in lineage],
            }
        )
    final = storage / (args.final or f"{args.experiment}-final")
    finalized = json.loads((final / "finalize.json").read_text())
    seeds = [
        {"run": run.name, **row(load_config(str(run / "config.yaml")), run, epochs)}
        for run in sorted(final.glob("seed*"))
    ]
    doc = {
        "what": args.what,
        "commit": args.commit or commit(),
        "command": args.command,
        "trials": trials,
        "winner": finalized["winner"],
        "schedule": finalized.get("schedule"),
        "finalize": seeds,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    for r in trials + seeds:
        print(
            r.get("trial", r.get("run")),
            r["seed"],
            r["config_hash"],
            *(round(100 * r[k], 2) for k in ("selected_val_acc", "selected_test_acc", "last_test_acc")),
            round(100 * (r["pseudo_acc_last_quarter"] or 0), 1),
        )


if __name__ == "__main__":
    main()
