"""Learning-rate schedules as pure functions of run progress (0 at the start, 1 at the end).

The engine sets ``lr = base_lr * factor(progress)`` before every step. Keeping the base lr in the
config rather than in optimizer state is what lets PBT's perturbed lr take effect after a restore,
and expressing milestones as fractions makes short runs decay too.
"""

from __future__ import annotations

import bisect
import math


def warmup_cosine(progress: float, warmup_fraction: float) -> float:
    """Linear warm-up over ``warmup_fraction`` of the run, then cosine decay to 0 over the rest."""
    if progress < warmup_fraction:
        return progress / warmup_fraction
    span = 1.0 - warmup_fraction
    done = (progress - warmup_fraction) / span if span > 0 else 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


def multistep(progress: float, milestones: list[float], gamma: float) -> float:
    """Multiply by ``gamma`` at each milestone already passed."""
    return gamma ** bisect.bisect_right(sorted(milestones), progress)


def ramp(progress: float, fraction: float) -> float:
    """0 at the start, rising linearly to 1 at ``fraction`` of the run, 1 after (1 throughout when 0)."""
    return min(1.0, progress / fraction) if fraction > 0 else 1.0
