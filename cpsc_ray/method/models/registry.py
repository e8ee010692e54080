"""The classifiers a config can name (``teacher.arch``, ``student.arch``): each model family registers its builders
here, with the version of what given weights compute and, for the reference's model zoo, how its state-dict names
map to ours."""

from __future__ import annotations

from typing import Callable

from torch import nn

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


def build_model(name: str, num_classes: int, channels: int = 3, **kwargs) -> nn.Module:
    return MODELS.get(name)(num_classes=num_classes, channels=channels, **kwargs)
