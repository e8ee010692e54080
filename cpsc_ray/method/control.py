"""The generator's pseudo-label CE weight steered by the teacher's agreement (``loss.agreement_target``).

The weight at which a teacher sees the generator's classes differs from teacher to teacher: at ``loss.eta=1`` the
digits CNN agrees with 76% of the pseudo-labels, the registry ResNet-18 with 34% and MobileNetV2 with 13%
(BENCHMARKS.md, issue 19). With a target the agreement is a constraint instead of a weight to tune: the weight is
``eta`` times a multiplier ``m``, and after each generator step ``m <- m * exp(rate * (target - agreement))`` (GECO's
multiplicative Lagrange update), so ``m`` rises while the teacher sees fewer of the asked-for classes than the target
and falls once it sees more: each teacher gets the CE it needs, and no more.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cpsc_ray.config import LossConfig

# The multiplier stays within [1/LIMIT, LIMIT]: on a teacher that cannot be conditioned the CE is not driven up until
# it drowns every other term, nor, on one that agrees at any weight, down to nothing.
LIMIT = 100.0


class AgreementControl:
    def __init__(self, device: torch.device):
        self.log_multiplier = torch.zeros((), device=device)

    @property
    def multiplier(self) -> Tensor:
        return self.log_multiplier.exp()

    def update(self, agreement: Tensor, cfg: LossConfig) -> None:
        """``agreement``: the fraction of the step's images the teacher assigned to their pseudo-labels (a 0-d tensor;
        the global batch's in a distributed run, so every rank's multiplier stays the same). No host sync."""
        step = cfg.agreement_rate * (cfg.agreement_target - agreement)
        bound = math.log(LIMIT)
        self.log_multiplier = (self.log_multiplier + step).clamp(-bound, bound)
