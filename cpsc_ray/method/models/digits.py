"""A small teacher/student pair sized for the embedded digits data (1x16x16 by default).

The student's feature is narrower than the teacher's, so the default run also exercises the
projection head that the contrastive loss needs when widths differ."""

from __future__ import annotations

import torch
from torch import nn

from cpsc_ray.method.models.layers import global_average
from cpsc_ray.method.models.registry import register_model


def conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, widths: tuple[int, int, int], num_classes: int, channels: int):
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            *conv_bn_relu(channels, w1),
            *conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),
            *conv_bn_relu(w2, w3),
            nn.MaxPool2d(2),
        )
        self.feature_dim = w3
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = global_average(self.features(x))
        logits = self.fc(features)
        return (logits, features) if return_features else logits


@register_model("digits_teacher")
def digits_teacher(num_classes: int, channels: int = 1) -> SmallCNN:
    return SmallCNN((32, 64, 128), num_classes, channels)


@register_model("digits_student")
def digits_student(num_classes: int, channels: int = 1) -> SmallCNN:
    return SmallCNN((16, 32, 64), num_classes, channels)
