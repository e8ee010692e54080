"""What runs report to Ray: a metric row's numbers for Ray Train, and for Ray Tune also the objective's
current and best values and the compute spent since the last report."""

from __future__ import annotations

import uuid
from typing import Any

WORST_SCORE = -1.0  # below every accuracy: a diverged trial ranks last and PBT replaces it


def ray_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """A metric row as Ray reports it: its numbers, without the config columns."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith("config/")}


def tune_metrics(row: dict[str, Any], history: list[dict[str, Any]], metric: str, images_spent: int) -> dict[str, Any]:
    """What a trial reports to Tune: the row's numbers; ``score``, the objective's current value (what
    PBT and ASHA compare); ``best_score``, its best so far (what Optuna optimises, and what finalize and
    the report rank by); and ``images_spent``, the images synthesized since the last report (what a
    compute budget adds up)."""
    metrics = ray_metrics(row)
    values = [r[metric] for r in history if r.get(metric) is not None]
    metrics["score"] = WORST_SCORE if row.get("diverged") or not values else values[-1]
    metrics["best_score"] = max(values) if values else WORST_SCORE
    metrics["images_spent"] = images_spent
    metrics["report_id"] = uuid.uuid4().hex  # Tune repeats a finished trial's last result; count it once
    return metrics
