"""Generators of synthetic images: CPSC-DFKD's class-conditional ones and their unconditional twins.

Both architectures follow METHOD.md: ``upsample`` is the 32x32 CIFAR generator (works for any side
divisible by 4; the reference code runs it at 64 px for Tiny-ImageNet too), ``dcgan`` the DCGAN-like
64x64 one the paper describes (any side divisible by 16). Outputs are in the teacher's normalised input space.
"""

from __future__ import annotations

import torch
from torch import nn

from cpsc_ray.registry import Registry


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm without affine parameters, then a per-class scale and shift from two embedding tables.

    This is the "categorical feature embedding block": each class gets its own modulation of the
    normalised features, which lets one generator keep the class distributions apart.
    """

    def __init__(self, num_classes: int, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, affine=False)
        self.scale = nn.Embedding(num_classes, channels)
        self.shift = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.norm(x)
        return out * self.scale(labels)[:, :, None, None] + self.shift(labels)[:, :, None, None]


class PlainBatchNorm2d(nn.BatchNorm2d):
    """The unconditional stand-in: ordinary affine batch norm that ignores the labels."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class Generator(nn.Module):
    """Base class: ``forward(z, labels)`` -> images ``[B, channels, image_size, image_size]``."""

    conditional: bool

    def __init__(self, nz: int, num_classes: int, conditional: bool):
        super().__init__()
        self.nz = nz
        self.num_classes = num_classes
        self.conditional = conditional

    def norm(self, channels: int) -> nn.Module:
        return ConditionalBatchNorm2d(self.num_classes, channels) if self.conditional else PlainBatchNorm2d(channels)


# generator.arch -> the generator class. auto is the reference code's choice: the upsample generator at every size
# (at Tiny-ImageNet's 64 px its linear layer maps to 16x16), never the DCGAN-like one the paper describes for 64 px,
# which is used by name only.
GENERATORS: Registry[type[Generator]] = Registry("generator architecture")


@GENERATORS.register("auto")
@GENERATORS.register("upsample")
class UpsampleGenerator(Generator):
    """METHOD.md's 32x32 generator: linear, cond-BN, two (upsample, conv3x3, cond-BN, LeakyReLU) stages,
    conv3x3 to the image channels, tanh, then a cond-BN over the output channels."""

    def __init__(self, nz: int, ngf: int, channels: int, image_size: int, num_classes: int, conditional: bool = True):
        super().__init__(nz, num_classes, conditional)
        if image_size % 4:
            raise ValueError(f"the upsample generator needs an image side divisible by 4, got {image_size}")
        self.init_size = image_size // 4
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.norm0 = self.norm(2 * ngf)
        self.conv1 = nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1)
        self.norm1 = self.norm(2 * ngf)
        self.conv2 = nn.Conv2d(2 * ngf, ngf, 3, 1, 1)
        self.norm2 = self.norm(ngf)
        self.to_image = nn.Conv2d(ngf, channels, 3, 1, 1)
        self.norm_out = self.norm(channels)
        self.up = nn.Upsample(scale_factor=2)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.project(z.flatten(1)).view(z.shape[0], -1, self.init_size, self.init_size)
        out = self.norm0(out, labels)
        out = self.act(self.norm1(self.conv1(self.up(out)), labels))
        out = self.act(self.norm2(self.conv2(self.up(out)), labels))
        return self.norm_out(torch.tanh(self.to_image(out)), labels)


@GENERATORS.register("dcgan")
class DCGANGenerator(Generator):
    """METHOD.md's 64x64 generator: linear to 8ngf x s/16 x s/16, cond-BN, four transposed convs
    (k4, s2) each followed by cond-BN and LeakyReLU(0.2), conv3x3 to the channels, tanh."""

    def __init__(self, nz: int, ngf: int, channels: int, image_size: int, num_classes: int, conditional: bool = True):
        super().__init__(nz, num_classes, conditional)
        if image_size % 16:
            raise ValueError(f"the dcgan generator needs an image side divisible by 16, got {image_size}")
        self.init_size = image_size // 16
        self.project = nn.Linear(nz, 8 * ngf * self.init_size**2)
        self.norm0 = self.norm(8 * ngf)
        widths = [8 * ngf, 4 * ngf, 2 * ngf, ngf, ngf]
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False) for w_in, w_out in zip(widths, widths[1:])
        )
        self.norms = nn.ModuleList(self.norm(w) for w in widths[1:])
        self.to_image = nn.Conv2d(ngf, channels, 3, 1, 1)
        self.act = nn.LeakyReLU(0.2)
        for m in self.modules():
            if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.project(z.flatten(1)).view(z.shape[0], -1, self.init_size, self.init_size)
        out = self.norm0(out, labels)
        for deconv, norm in zip(self.deconvs, self.norms):
            out = self.act(norm(deconv(out), labels))
        return torch.tanh(self.to_image(out))


def build_generator(
    arch: str, nz: int, ngf: int, channels: int, image_size: int, num_classes: int, conditional: bool = True
) -> Generator:
    """The ``generator.arch`` generator; ``conditional=False`` gives its unconditional twin (``generator.kind``'s
    ablation, ``method.synthesis``)."""
    return GENERATORS.get(arch, "generator.arch")(nz, ngf, channels, image_size, num_classes, conditional=conditional)
