"""What ``dynamics: reference`` sets (``config.Config``), unless the config sets the field itself: every value in
which the reference code's CIFAR runs (its README's command) differ from cpsc-ray's defaults, so the preset is the
reference's effective behaviour (METHOD.md, "what those defects do in practice"). Budgets (epochs, batch, steps, the
student's warm-up length) stay the config's. The reference's student schedule needs no field: its cosine, stepped
twice per epoch, ends up at the closed form ``cos(pi * (epoch - warm-up) / epochs)`` that the warm-up wrapper sets
last, which is cpsc-ray's warm-up then cosine (BENCHMARKS.md, "The reference preset")."""

from __future__ import annotations

from typing import Any


def reference_dynamics(dataset: str) -> dict[tuple[str, str], Any]:
    return {
        ("generator", "reset_optimizer"): True,
        ("generator", "lr_milestones"): [],
        ("loss", "ce_on"): "probabilities",
        ("loss", "eta"): 0.7,
        ("loss", "eta_student"): 0.7,
        # The reference takes the log forms on CIFAR-10 and plain MSE on every other data set.
        ("loss", "ikd_form"): "log" if dataset == "cifar10" else "mse",
        ("loss", "bn_form"): "raw",
        ("loss", "base_temperature"): 0.07,
        ("loss", "gate_pseudo_labels"): False,
        ("loss", "gate_contrast"): False,
        ("loss", "adversarial"): 1.0,
        ("loss", "adversarial_warmup"): 0.0,
    }


REFERENCE_FIELDS = tuple(reference_dynamics("digits"))
