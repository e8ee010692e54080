"""CIFAR-style ResNets (3x3 stem, no max-pool); global pooling makes them work at 32x32 and 64x64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cpsc_ray.method.models.layers import global_average
from cpsc_ray.method.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: list[int], num_classes: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_planes = [], 64
        for planes, blocks, stride in zip((64, 128, 256, 512), blocks_per_stage, (1, 2, 2, 2)):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = 512
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        features = global_average(out)
        logits = self.linear(features)
        return (logits, features) if return_features else logits


@register_model("resnet18")
def resnet18(num_classes: int, channels: int = 3) -> ResNet:
    return ResNet([2, 2, 2, 2], num_classes, channels)


@register_model("resnet34")
def resnet34(num_classes: int, channels: int = 3) -> ResNet:
    return ResNet([3, 4, 6, 3], num_classes, channels)
