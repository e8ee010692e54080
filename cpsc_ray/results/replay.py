"""A PBT trial's lineage replayed: the clones its state went through, the hyperparameter phases they add up to (what
``finalize`` reruns, as Ray's ``PopulationBasedTrainingReplay`` does) and the keys the exploits changed."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from cpsc_ray.results.schema import RUN_KEYS, config_values

Phases = list[tuple[int, dict[str, Any]]]  # (first epoch it applies to, dotted config values)


def clones(lineage: pd.DataFrame, trial_id: str, until: int) -> list[tuple[int, str]]:
    """The clones along the lineage of the state ``trial_id`` holds at ``until``, earliest first, as
    (the source's epoch the state was copied at, the source trial)."""
    records = lineage[(lineage.trial_id == trial_id) & (lineage.epoch < until)].sort_values("epoch")
    if records.empty:
        return []
    last = records.iloc[-1]
    return [*clones(lineage, last.source_trial_id, int(last.epoch)), (int(last.epoch), last.source_trial_id)]


def lineage_phases(epochs: pd.DataFrame, lineage: pd.DataFrame, trial_id: str, until: int) -> Phases:
    """The config in effect at every epoch 1..until of the state ``trial_id`` holds at ``until``: each
    trial along its clones from the epoch after the previous clone through the epoch it was copied at."""
    chain = clones(lineage, trial_id, until)
    copied_at = [epoch for epoch, _ in chain]
    segments = zip([0, *copied_at], [*copied_at, until], [*(source for _, source in chain), trial_id])
    phases: Phases = []
    for after, through, trial in segments:
        own = epochs[(epochs.trial_id == trial) & (epochs.epoch > after) & (epochs.epoch <= through)]
        for _, row in own.sort_values("epoch").iterrows():
            config = config_values(row)
            if not phases or phases[-1][1] != config:
                phases.append((int(row.epoch), config))
    return phases


def mutated_keys(epochs: pd.DataFrame, lineage: pd.DataFrame) -> list[str]:
    """The numeric keys an exploit changed (the config a clone ran with against the one it had), or
    without any exploit the numeric keys the population was sampled over."""
    changed: set[str] = set()
    for record in lineage.itertuples():
        before, after = json.loads(record.config_before) or {}, json.loads(record.config_after)
        changed |= {k for k, v in after.items() if before.get(k) != v and isinstance(v, (int, float))}
    if not changed:
        changed = {
            c.removeprefix("config/")
            for c in epochs.columns
            if c.startswith("config/") and pd.api.types.is_numeric_dtype(epochs[c]) and epochs[c].nunique() > 1
        }
    return sorted(changed - RUN_KEYS)
