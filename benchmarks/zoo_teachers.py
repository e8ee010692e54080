"""Teachers a user would bring from torchvision's model zoo, adapted to the 1-channel 16 px digits.

Given to cpsc-ray as ``teacher.builder: zoo_teachers:<function>`` (this folder on ``sys.path``):
plain ``nn.Module``s without ``return_features``; cpsc-ray reads their penultimate feature at the input
of their last linear layer (``fc`` for ResNet, ``classifier.1`` for MobileNetV2, which has no ``avgpool``).
"""

from __future__ import annotations

import torchvision
from torch import nn


def torchvision_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 (20 BatchNorm layers) with a 1-channel 3x3 stride-1 stem; its max-pool stays."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    return model


def torchvision_mobilenet_v2(num_classes: int = 10) -> nn.Module:
    """torchvision's MobileNetV2 (52 BatchNorm layers, depthwise convolutions, inverted residuals) with a
    1-channel stride-1 stem: 16 px maps shrink to 1x1 by its last stage."""
    model = torchvision.models.mobilenet_v2(num_classes=num_classes)
    model.features[0][0] = nn.Conv2d(1, 32, 3, 1, 1, bias=False)
    return model
