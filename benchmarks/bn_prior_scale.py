"""How strongly does the BN prior pull the generator, against the pseudo-label CE, per teacher?

For each zoo teacher (see teacher_zoo.py; trained there first), one batch from a freshly initialised
conditional generator: the value of the BN prior in both forms and of the teacher's pseudo-label CE,
and the norm of each one's gradient at the generator's weights (weights 1).

    python benchmarks/bn_prior_scale.py --storage /tmp/zoo --teachers digits_cnn resnet18
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from teacher_zoo import TEACHERS, teacher_weights

from cpsc_ray.config import load_config, with_values
from cpsc_ray.method.generators import build_generator
from cpsc_ray.method.losses import BNStatisticsPrior
from cpsc_ray.runs.teacher import load_teacher


def gradient_norm(value: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None])).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", type=Path, required=True)
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| teacher | BN layers | raw BN: value, grad | standardized BN: value, grad | CE: value, grad |")
    print("|---|---|---|---|---|")
    for name in args.teachers:
        weights = str(teacher_weights(name, args.storage))
        cfg = with_values(load_config("digits"), {**TEACHERS[name], "teacher.weights": weights})
        teacher = load_teacher(cfg)
        torch.manual_seed(args.seed)
        g = cfg.generator
        generator = build_generator(g.arch, g.kind, g.nz, g.ngf, teacher.info.channels, teacher.info.image_size, 10)
        labels = torch.randint(0, 10, (cfg.train.batch_size,))
        images = generator(torch.randn(cfg.train.batch_size, g.nz), labels)
        params = list(generator.parameters())
        cells = []
        for form in ("raw", "standardized"):
            prior = BNStatisticsPrior(teacher.model, form=form)
            with prior.capture():
                logits = teacher.model(images)
            value = prior()
            cells.append(f"{value.item():.3g}, {gradient_norm(value, params):.3g}")
            prior.close()
        ce = F.cross_entropy(logits, labels)
        cells.append(f"{ce.item():.3g}, {gradient_norm(ce, params):.3g}")
        print(f"| {name} | {len(prior.layers)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
