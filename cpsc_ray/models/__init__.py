"""Classifier registry. Every model maps images to logits and, with ``return_features=True``,
to ``(logits, penultimate_features)``; ``feature_dim`` is the width of those features."""

from __future__ import annotations

from torch import nn

from cpsc_ray.registry import Registry

MODELS: Registry = Registry("model")

# Importing the modules registers their models.
from cpsc_ray.models import digits, resnet, vgg, wrn  # noqa: E402,F401


def build_model(name: str, num_classes: int, channels: int = 3, **kwargs) -> nn.Module:
    return MODELS.get(name)(num_classes=num_classes, channels=channels, **kwargs)
