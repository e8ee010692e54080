"""Measuring a model on labelled images, and which set selects the best checkpoint.

``test`` measures the student and is never used to choose anything. ``val`` is a hold-out of the real
training data; ``proxy`` is agreement with the teacher on the teacher's probe set (data-free).
Best checkpoints are chosen by ``val``, or by ``proxy`` when there is no validation split.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from cpsc_ray.method.spec import EvalSet

METRIC_OF_SET = {"val": "val_acc", "proxy": "proxy", "test": "test_acc"}


def materialize(dataset: Dataset, batch_size: int = 1024, num_workers: int = 0) -> EvalSet:
    images, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        images.append(x)
        labels.append(torch.as_tensor(y))
    return EvalSet(torch.cat(images), torch.cat(labels))


def selection_metric(eval_sets: dict[str, EvalSet]) -> str | None:
    """The metric that picks "best": never the test accuracy."""
    for name in ("val", "proxy"):
        if name in eval_sets:
            return METRIC_OF_SET[name]
    return None


@torch.no_grad()
def top1(model: torch.nn.Module, eval_set: EvalSet, device: torch.device, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(eval_set.labels), batch_size):
        logits = model(eval_set.images[start : start + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == eval_set.labels[start : start + batch_size]).sum().item()
    return correct / max(len(eval_set.labels), 1)
