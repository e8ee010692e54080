"""Warnings for a run that is failing while it still runs, so nobody waits 600 epochs to find out.

Two symptoms, each reported once, when it has lasted ``PATIENCE`` consecutive epochs in which it
was measured:

- a collapsed student: it predicts fewer than half of the classes on the selection set, or its
  agreement there (validation accuracy, or the proxy) sits near chance. An epoch above chance in which
  the student predicts more classes than ever before in the run does not count: a many-class student
  starts so (the 100-class glyph row: 7, 17, 33, 41, 60% of the classes over its first epochs), a
  collapsed one loses classes or stays where it is;
- pseudo-supervision not in effect: the teacher assigns the conditional generator's images to their
  pseudo-labels at less than twice chance (or 50%), so the method's class-conditional part is not doing its job,
  even where the student learns.

Divergence (a NaN or infinite loss) stops the run instead (``engine.DivergenceError``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from cpsc_ray.config import Config
from cpsc_ray.results.schema import MIN_COVERAGE

logger = logging.getLogger(__name__)

PATIENCE = 2
CHANCE_MULTIPLE = 2.0  # agreement (or pseudo-label accuracy) below this many times chance is "at chance"

COLLAPSE = "collapse"
NO_PSEUDO_SUPERVISION = "pseudo_supervision"


class HealthMonitor:
    """Looks at each epoch's metric row; returns (and logs) the warnings that became due."""

    def __init__(self, cfg: Config, num_classes: int, selection: str | None):
        self.chance = 1.0 / num_classes
        self.min_pseudo_acc = min(0.5, CHANCE_MULTIPLE * self.chance)
        self.selection = selection
        self.conditional = cfg.generator.kind == "conditional"
        # The student has barely trained before its warm-up ends: judge it from then on. The generator
        # needs longer to learn its classes: judge it from a quarter of the run on.
        self.first_epoch = {
            COLLAPSE: max(2, int(cfg.student.warmup_fraction * cfg.train.epochs) + 1),
            NO_PSEUDO_SUPERVISION: max(2, math.ceil(cfg.train.epochs / 4) + 1),
        }
        self.streaks: dict[str, int] = {}
        self.widest_coverage = 0.0  # the most classes the student has predicted in an epoch of this run
        self.warnings: list[str] = []
        self._reported: set[str] = set()

    def state(self) -> dict[str, Any]:
        return {
            "streaks": self.streaks,
            "widest_coverage": self.widest_coverage,
            "warnings": self.warnings,
            "reported": sorted(self._reported),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.streaks = dict(state.get("streaks", {}))
        self.widest_coverage = float(state.get("widest_coverage", 0.0))
        self.warnings = list(state.get("warnings", []))
        self._reported = set(state.get("reported", []))

    def observe(self, row: dict[str, Any]) -> list[str]:
        found = {}
        coverage = row.get("class_coverage")
        if coverage is not None:  # evaluated this epoch
            if row["epoch"] >= self.first_epoch[COLLAPSE]:
                found[COLLAPSE] = self._collapse(row)
            self.widest_coverage = max(self.widest_coverage, coverage)
        if row["epoch"] >= self.first_epoch[NO_PSEUDO_SUPERVISION] and self.conditional:
            found[NO_PSEUDO_SUPERVISION] = self._no_pseudo_supervision(row)
        new = []
        for symptom, message in found.items():
            if message is None:
                self.streaks[symptom] = 0  # a healthy measurement breaks the streak
                continue
            self.streaks[symptom] = self.streaks.get(symptom, 0) + 1
            if self.streaks[symptom] >= PATIENCE and symptom not in self._reported:
                self._reported.add(symptom)
                text = f"epoch {row['epoch']}: {message}"
                self.warnings.append(text)
                logger.warning("%s", text)
                new.append(text)
        return new

    def _collapse(self, row: dict[str, Any]) -> str | None:
        coverage = row["class_coverage"]
        agreement = row.get(self.selection) if self.selection else None
        near_chance = agreement is not None and agreement <= CHANCE_MULTIPLE * self.chance
        # Above chance, a student that predicts more classes than ever before is still spreading out.
        if not near_chance and (coverage >= MIN_COVERAGE or coverage > self.widest_coverage):
            return None
        where = "validation set" if self.selection == "val_acc" else "probe set"
        agreed = f" and agrees with the labels on {agreement:.1%}" if agreement is not None else ""
        return (
            f"the student has collapsed: it predicts {coverage:.0%} of the classes on the {where}{agreed} "
            f"(chance {self.chance:.1%}). Try a longer student warm-up (student.warmup_fraction), a lower "
            f"student.lr, a smaller loss.alpha, or tune the run (cpsc-ray tune)"
        )

    def _no_pseudo_supervision(self, row: dict[str, Any]) -> str | None:
        accuracy = row["teacher_pseudo_acc"]
        if accuracy >= self.min_pseudo_acc:
            return None
        return (
            f"the generator's images are not those of their pseudo-labels: the teacher assigns {accuracy:.1%} "
            f"of them to their class (chance {self.chance:.1%}), so the method's pseudo-supervision is not in "
            f"effect; the student learns from BN-matched adversarial images alone. That can be enough (a "
            f"label-smoothed ResNet-18 distils within 3 points without it: BENCHMARKS.md, the zoo): judge the run by "
            f"its validation or proxy accuracy, and compare an unconditional generator (generator.kind=unconditional "
            f"loss.eta=0 loss.eta_student=0), the better student on six of seven zoo teachers. To restore it, "
            f"eval.term_gradients=true shows "
            f"which generator term drowns the pseudo-label CE: try loss.agreement_target=0.75, which raises the CE's "
            f"weight until the teacher agrees (on deep teachers at a cost in accuracy: BENCHMARKS.md), a longer "
            f"loss.adversarial_warmup, loss.bn_form=standardized (if raw) or a smaller loss.beta, or tune the run "
            f"(cpsc-ray tune)"
        )
