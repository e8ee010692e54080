"""CIFAR VGGs with batch norm (as in CRD/CMI): VGG-8 and VGG-11."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cpsc_ray.models import MODELS

# Convolution widths per stage; each stage ends with a 2x2 max-pool except the last.
STAGES = {
    "vgg8_bn": [[64], [128], [256], [512], [512]],
    "vgg11_bn": [[64], [128], [256, 256], [512, 512], [512, 512]],
}


class VGG(nn.Module):
    def __init__(self, stages: list[list[int]], num_classes: int, channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = channels
        for i, widths in enumerate(stages):
            for width in widths:
                layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                in_ch = width
            if i < len(stages) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        logits = self.classifier(features)
        return (logits, features) if return_features else logits


def _register(name: str) -> None:
    @MODELS.register(name)
    def build(num_classes: int, channels: int = 3) -> VGG:
        return VGG(STAGES[name], num_classes, channels)


for _name in STAGES:
    _register(_name)
