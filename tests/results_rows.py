"""Epoch rows as runs write them, for tests of how results are read and compared without running anything."""

from __future__ import annotations


def epoch_row(experiment: str, kind: str, method: str, accuracy: float, source_experiment: str | None = None) -> dict:
    """One evaluated epoch of a digits run: a tuning trial ``t0`` or a finalize seed ``seed0``."""
    return {
        "experiment": experiment,
        "kind": kind,
        "method": method,
        "trial_id": "t0" if kind == "tune" else "seed0",
        "selection": "val_acc",
        "dataset": "digits",
        "teacher": "digits_teacher",
        "student": "digits_student",
        "seed": 0,
        "workers": 1,
        "device": "cpu",
        "source_experiment": source_experiment,
        "epoch": 1,
        "epoch_images": 10,
        "epoch_s": 1.0,
        "val_acc": accuracy,
        "test_acc": accuracy,
    }
