"""Wide ResNets (Zagoruyko & Komodakis) in the CIFAR form used by DFKD papers: WRN-depth-width."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from cpsc_ray.method.models.layers import global_average
from cpsc_ray.method.models.registry import register_model


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None if in_planes == planes else nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.bn2(out)))
        # When the width changes, the shortcut sees the pre-activated input, as in the original WRN.
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, channels: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        per_stage = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
        stages = []
        for stage, stride in enumerate((1, 2, 2)):
            blocks = [
                PreActBlock(widths[stage] if i == 0 else widths[stage + 1], widths[stage + 1], stride if i == 0 else 1)
                for i in range(per_stage)
            ]
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(widths[3])
        self.feature_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        features = global_average(out)
        logits = self.fc(features)
        return (logits, features) if return_features else logits


def from_zoo(key: str) -> str:
    """The zoo's names (ZSKT/CRD/CMI WRN): ``blockN.layer.i`` -> ``blockN.i``, ``convShortcut`` -> ``shortcut``,
    and its final ``bn1`` -> ``bn``; blocks hold the same layers."""
    key = re.sub(r"^block(\d+)\.layer\.", r"block\1.", key)
    key = key.replace(".convShortcut.", ".shortcut.")
    return re.sub(r"^bn1\.", "bn.", key)


def _register(depth: int, widen: int) -> None:
    @register_model(f"wrn_{depth}_{widen}", zoo_keys=from_zoo)
    def build(num_classes: int, channels: int = 3) -> WideResNet:
        return WideResNet(depth, widen, num_classes, channels)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)
