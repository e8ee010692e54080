"""Teachers a user would bring from torchvision's model zoo, adapted to the 1-channel 16 px digits.

Given to cpsc-ray as ``teacher.builder: zoo_teachers:<function>`` (this folder on ``sys.path``):
plain ``nn.Module``s without ``return_features``, read through ``teacher.feature_layer``.
"""

from __future__ import annotations

import torchvision
from torch import nn


def torchvision_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 (20 BatchNorm layers) with a 1-channel 3x3 stride-1 stem; its max-pool stays."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    return model
