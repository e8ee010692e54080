"""Classifiers. Every model maps images to logits and, with ``return_features=True``, to
``(logits, penultimate_features)``; ``feature_dim`` is the width of those features. Importing the package
registers every family's models (``registry``)."""

from cpsc_ray.method.models import digits, resnet, vgg, wrn  # noqa: F401  (they register their models)
from cpsc_ray.method.models.registry import ARCH_VERSIONS, MODELS, ZOO_KEYS, build_model

__all__ = ["ARCH_VERSIONS", "MODELS", "ZOO_KEYS", "build_model"]
