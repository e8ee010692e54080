"""Fidelity to the reference code (issue #9): builder teachers trained here."""

from __future__ import annotations

import json

import torchvision
from torch import nn

from cpsc_ray.config import load_config, with_values
from cpsc_ray.teacher import card_path, load_teacher, train_teacher


def digits_resnet18(num_classes: int = 10) -> nn.Module:
    """A user's torchvision ResNet-18 with a 1-channel 3x3 stem for the 16 px digits."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    return model


def test_builder_teacher_trains_and_loads(tmp_path):
    cfg = with_values(
        load_config("digits", ["teacher_training.epochs=2"]),
        {"teacher.arch": None, "teacher.builder": "test_fidelity:digits_resnet18", "teacher.feature_layer": "avgpool"},
    )
    path = train_teacher(cfg, out=tmp_path, progress=False)
    card = json.loads(card_path(path).read_text())
    assert card["arch"] == "test_fidelity:digits_resnet18"
    assert card["test_acc"] > 0.3  # chance is 0.1: it learnt
    teacher = load_teacher(with_values(cfg, {"teacher.weights": str(path)}))
    assert teacher.card.arch == card["arch"] and teacher.model.model.fc.out_features == 10
