"""CIFAR VGGs with batch norm, the network of the CRD/CMI model zoo that the reference code uses: VGG-8 and VGG-11."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from cpsc_ray.method.models.layers import global_average
from cpsc_ray.method.models.registry import register_model

# Convolution widths per stage (the zoo's configurations "S" and "A").
STAGES = {
    "vgg8_bn": [[64], [128], [256], [512], [512]],
    "vgg11_bn": [[64], [128], [256, 256], [512, 512], [512, 512]],
}
# Version 2: the zoo's pooling rule (version 1 pooled before every stage, so the last one saw 2x2 maps at 32 px).
VERSION = 2


class VGG(nn.Module):
    def __init__(self, stages: list[list[int]], num_classes: int, channels: int):
        super().__init__()
        blocks: list[nn.Module] = []
        in_ch = channels
        for widths in stages:
            layers: list[nn.Module] = []
            for width in widths:
                layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                in_ch = width
            blocks.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(blocks)
        self.feature_dim = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)
        # The zoo's initialisation, so teachers trained here start where the reference's did.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        # The zoo's rule: a 2x2 max-pool before stages 1-3 always, before the last stage only when the input is
        # exactly 64 px high, so the last stage works on 4x4 maps at 32 and at 64 px. At every other size we follow
        # the rule literally (16 px: the last two stages both see 2x2 maps, where a pool would leave 1x1 maps that
        # the 3x3 convolutions see mostly as padding): a 16 px teacher trained with the zoo's code then computes here
        # what it computed there.
        pool_before_last = x.shape[2] == 64
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            if i > 0 and (i < last or pool_before_last):
                x = F.max_pool2d(x, 2)
            x = stage(x)
        features = global_average(x)
        logits = self.classifier(features)
        return (logits, features) if return_features else logits


def from_zoo(key: str) -> str:
    """``block{i}.{j}`` -> ``stages.{i}.{j}``: the zoo's blocks hold the same (conv, BN, ReLU) runs, minus a final
    ReLU, so the indices inside a block agree."""
    return re.sub(r"^block(\d+)\.", r"stages.\1.", key)


def _register(name: str) -> None:
    @register_model(name, version=VERSION, zoo_keys=from_zoo)
    def build(num_classes: int, channels: int = 3) -> VGG:
        return VGG(STAGES[name], num_classes, channels)


for _name in STAGES:
    _register(_name)
