"""Why does a run fail? One distillation of a zoo teacher (see teacher_zoo.py) with the per-term
diagnostics on, printed per epoch: each generator term's value and weighted gradient norm at the
generator, the teacher's logit scale on synthetic images, the teacher's accuracy on the
pseudo-labels, the student's class coverage and validation accuracy, and the learning rates.

    python benchmarks/generator_terms.py --teacher tv_resnet18 --storage /tmp/zoo [overrides...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq
from teacher_zoo import TEACHERS, run_cell

COLUMNS = (
    ["epoch", "lr_generator", "lr_student"]
    + [f"g_{t}" for t in ("kd", "ikd", "bn", "scl", "ce")]
    + [f"g_grad_{t}" for t in ("kd", "ikd", "bn", "scl", "ce")]
    + ["teacher_logit_rms", "student_logit_rms", "teacher_pseudo_acc", "class_coverage", "val_acc", "s_total"]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", choices=list(TEACHERS), required=True)
    parser.add_argument("--storage", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="terms")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    row = run_cell(args.teacher, args.seed, args.storage, args.label, ["eval.term_gradients=true", *args.overrides])
    metrics = pq.read_table(args.storage / "runs" / f"{args.label}-{args.teacher}-s{args.seed}" / "metrics.parquet")
    frame = metrics.to_pandas()[[c for c in COLUMNS if c in metrics.column_names]]
    print(frame.T.to_string(float_format=lambda v: f"{v:.3g}"))
    print({k: row[k] for k in ("selected_test_acc", "last_test_acc", "diverged", "wall_s") if k in row})


if __name__ == "__main__":
    main()
