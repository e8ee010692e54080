"""Classifier registry. Every model maps images to logits and, with ``return_features=True``,
to ``(logits, penultimate_features)``; ``feature_dim`` is the width of those features."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from cpsc_ray.registry import Registry

MODELS: Registry = Registry("model")
# Bumped whenever a change alters what given weights compute, so cached teachers of an older version are retrained.
ARCH_VERSIONS: dict[str, int] = {}
# Renames a state-dict key from the reference's (CRD/CMI model zoo) naming to ours; leaves our own names alone.
ZOO_KEYS: dict[str, Callable[[str], str]] = {}


def register_model(
    name: str, version: int = 1, zoo_keys: Callable[[str], str] | None = None
) -> Callable[[Callable], Callable]:
    def add(builder: Callable) -> Callable:
        MODELS.register(name)(builder)
        ARCH_VERSIONS[name] = version
        if zoo_keys is not None:
            ZOO_KEYS[name] = zoo_keys
        return builder

    return add


def global_average(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C). A mean, not adaptive_avg_pool2d: that one's CUDA backward, which generator
    steps run through the teacher, has no deterministic kernel (issue 13); the values are the same."""
    return x.mean((2, 3))


# Importing the modules registers their models.
from cpsc_ray.method.models import digits, resnet, vgg, wrn  # noqa: E402,F401


def build_model(name: str, num_classes: int, channels: int = 3, **kwargs) -> nn.Module:
    return MODELS.get(name)(num_classes=num_classes, channels=channels, **kwargs)
