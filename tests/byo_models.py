"""Models as a user would bring them: plain nn.Modules with no return_features argument."""

from torch import nn


def plain_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def no_bn_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)
    )


def conv_only_cnn(num_classes: int = 10) -> nn.Module:
    """A classifier with no linear layer: its logits are a 1x1 convolution's pooled output."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, num_classes, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def torchvision_mobilenet_v2(num_classes: int = 10) -> nn.Module:
    """torchvision's MobileNetV2 (no ``avgpool``; its head is ``classifier.1``) on 1-channel input."""
    import torchvision

    model = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=0.25)
    model.features[0][0] = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
    return model
