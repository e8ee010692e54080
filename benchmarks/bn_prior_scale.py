"""How strongly does the BN prior pull the generator, against the pseudo-label CE, per teacher?

For each zoo teacher (teacher_zoo.py trains it the first time), one batch from a freshly initialised
conditional generator of the digits default (the glyphs teacher: its 32 px RGB one): the value of the BN
prior in both forms and of the teacher's pseudo-label CE, the norm of each one's gradient at the
generator's weights (weights 1), and the ratio that decides which one the generator follows, at the
shipped weights: ``beta * |grad BN| / (eta * |grad CE|)`` for the shipped form (issue 19: within [0.3, 3]
on every teacher).

    python benchmarks/bn_prior_scale.py --storage /tmp/zoo [--teachers digits_cnn resnet18 ...] [--json rows.json]

Each JSON row records the commit, the seed and the config hash (the teacher named by its weights' digest).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from teacher_zoo import TEACHERS, base_config, commit, config_hash, teacher_weights

from cpsc_ray.config import with_values
from cpsc_ray.method.generators import build_generator
from cpsc_ray.method.losses import BNStatisticsPrior
from cpsc_ray.runs.teacher import load_teacher

FORMS = ("raw", "standardized")


def gradient_norm(value: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None])).item()


def measure(name: str, storage: Path, seed: int) -> dict:
    weights = teacher_weights(name, storage)
    cfg = with_values(base_config(name, storage), {"teacher.weights": str(weights), "seed": seed})
    teacher = load_teacher(cfg)
    info, g = teacher.info, cfg.generator
    torch.manual_seed(seed)
    generator = build_generator(
        g.arch, g.nz, g.ngf, info.channels, info.image_size, info.num_classes, conditional=g.kind == "conditional"
    )
    labels = torch.randint(0, info.num_classes, (cfg.train.batch_size,))
    images = generator(torch.randn(cfg.train.batch_size, g.nz), labels)
    params = list(generator.parameters())
    row = {"teacher": name, "seed": seed, "commit": commit(), "config_hash": config_hash(cfg, weights)}
    for form in FORMS:
        prior = BNStatisticsPrior(teacher.model, form=form)
        with prior.capture():
            logits = teacher.model(images)
        value = prior()
        row[form] = (value.item(), gradient_norm(value, params))
        row["layers"] = len(prior.layers)
        prior.close()
    ce = F.cross_entropy(logits, labels)
    row["ce"] = (ce.item(), gradient_norm(ce, params))
    row["ratio"] = cfg.loss.beta * row[cfg.loss.bn_form][1] / (cfg.loss.eta * row["ce"][1])
    row["shipped"] = f"beta {cfg.loss.beta:g} x {cfg.loss.bn_form} / eta {cfg.loss.eta:g}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", type=Path, required=True)
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    print("| teacher | BN layers | raw BN: value, grad | standardized BN: value, grad | CE: value, grad | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.teachers:
        row = measure(name, args.storage, args.seed)
        rows.append(row)
        cells = [f"{row[key][0]:.3g}, {row[key][1]:.3g}" for key in (*FORMS, "ce")]
        ratio = f"{row['ratio']:.2f} ({row['shipped']})"
        print(f"| {name} | {row['layers']} | " + " | ".join(cells) + f" | {ratio} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
