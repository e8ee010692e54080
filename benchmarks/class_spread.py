"""What a finished run's generator draws, in its teacher's eyes: does each class hold many images or a few?

For each run directory (``teacher_zoo.py``'s ``<storage>/runs/<name>``), the generator of its last checkpoint draws
``--per-class`` images of every class (a fixed noise seed), and the teacher and the student look at them:

- ``agreement``: the share the teacher assigns to the class asked for; ``teacher_confidence``: its mean top
  probability; ``class_entropy_bits``: the entropy of the teacher's predicted classes (log2 of the class count when
  balanced);
- ``spread_all`` and ``spread_within_class``: the mean cosine distance between the teacher's features of two
  images, over all pairs and over pairs the teacher puts in one class (averaged over classes): how far apart the
  images of one class are;
- ``student_agreement`` and ``kl_teacher_student``: how closely the student already follows the teacher on them
  (what is left for KD to teach).

    python benchmarks/class_spread.py --per-class 64 /work/zoo/runs/defaults-8-resnet18-s0 ... [--json rows.json]

Rows name the run, its epoch and the digest of the ``config.yaml`` it wrote.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from cpsc_ray.config import validate_tree
from cpsc_ray.errors import InputError
from cpsc_ray.layout import RunDir
from cpsc_ray.runs.assembly import prepare_engine
from cpsc_ray.runs.checkpoints import read_checkpoint, restore_engine

NOISE_SEED = 123


def mean_cosine_distance(features: torch.Tensor) -> float:
    unit = F.normalize(features.float(), dim=1)
    n = len(unit)
    return 1 - ((unit @ unit.T).sum().item() - n) / (n * (n - 1))


def look(run_dir: Path, per_class: int) -> dict:
    run = RunDir(str(run_dir))
    text = run.read_text(RunDir.CONFIG)
    cfg = validate_tree(yaml.safe_load(text), str(run_dir))
    engine = prepare_engine(cfg, torch.device("cpu")).engine
    state, meta = read_checkpoint(run, RunDir.LAST_CHECKPOINT)
    restore_engine(engine, state, str(run_dir))
    engine.student.eval()
    with torch.no_grad():
        images, labels = engine.synthesizer.preview(per_class, NOISE_SEED)
        teacher_logits, features = engine.teacher_fwd(images, return_features=True)
        student_logits = engine.student_fwd(images)
    probabilities = teacher_logits.softmax(1)
    predicted = probabilities.argmax(1)
    classes = probabilities.shape[1]
    share = torch.bincount(predicted, minlength=classes).float() / len(predicted)
    share = share[share > 0]
    within = [mean_cosine_distance(features[predicted == c]) for c in range(classes) if (predicted == c).sum() > 1]
    return {
        "run": run_dir.name,
        "config_yaml_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        "epoch": meta["epoch"],
        "images": len(labels),
        "agreement": (predicted == labels).float().mean().item(),
        "teacher_confidence": probabilities.max(1).values.mean().item(),
        "class_entropy_bits": float(-(share * share.log2()).sum()),
        "spread_all": mean_cosine_distance(features),
        "spread_within_class": sum(within) / len(within),
        "student_agreement": (student_logits.argmax(1) == predicted).float().mean().item(),
        "kl_teacher_student": F.kl_div(student_logits.log_softmax(1), probabilities, reduction="batchmean").item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with a last checkpoint")
    parser.add_argument("--per-class", type=int, default=64, help="images drawn of each class")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, failed = [], []
    for run_dir in args.runs:
        try:
            rows.append(look(run_dir, args.per_class))
        except (InputError, FileNotFoundError) as err:  # no config or checkpoint there: say so, look at the others
            failed.append(run_dir)
            print(f"{run_dir}: not a run with a last checkpoint ({err})", file=sys.stderr, flush=True)
            continue
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if failed:
        sys.exit(f"{len(failed)} of {len(args.runs)} runs could not be read (above)")


if __name__ == "__main__":
    main()
