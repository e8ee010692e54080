"""Warnings for failing runs: each fires on a constructed case, once, and stays silent on a healthy run."""

from __future__ import annotations

import logging

from cpsc_ray.config import with_values
from cpsc_ray.layout import RootDir
from cpsc_ray.runs.health import HealthMonitor
from cpsc_ray.runs.in_process import train_into


def rows(**columns):
    """Epoch rows 1..n from per-epoch column lists."""
    n = len(next(iter(columns.values())))
    return [{"epoch": i + 1, **{k: v[i] for k, v in columns.items()}} for i in range(n)]


def monitor(tiny_cfg, **changes):
    cfg = with_values(tiny_cfg, {"train.epochs": 10, "student.warmup_fraction": 0.1, **changes})
    return HealthMonitor(cfg, num_classes=10, selection="val_acc")


def feed(health, epoch_rows):
    return [(row["epoch"], warning) for row in epoch_rows for warning in health.observe(row)]


def test_collapse_is_reported_once_after_it_lasts(tiny_cfg, caplog):
    health = monitor(tiny_cfg)
    epochs = rows(
        class_coverage=[0.2, 0.1, 1.0, 0.1, 0.1, 0.1, 0.1],
        val_acc=[0.3, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1],
        teacher_pseudo_acc=[0.9] * 7,
    )
    with caplog.at_level(logging.WARNING, logger="cpsc_ray.runs.health"):
        found = feed(health, epochs)
    # Epoch 1 is still warm-up; epoch 3 breaks the streak; epochs 4 and 5 make it last.
    assert [epoch for epoch, _ in found] == [5]
    assert "collapsed" in found[0][1] and "10% of the classes" in found[0][1] and "warmup_fraction" in found[0][1]
    assert health.warnings == [found[0][1]] and found[0][1] in caplog.text


def test_agreement_at_chance_is_a_collapse_even_with_every_class_predicted(tiny_cfg):
    health = monitor(tiny_cfg)
    found = feed(health, rows(class_coverage=[1.0] * 4, val_acc=[0.12] * 4, teacher_pseudo_acc=[0.9] * 4))
    assert [epoch for epoch, _ in found] == [3]


def test_images_off_their_pseudo_labels_are_reported(tiny_cfg):
    health = monitor(tiny_cfg)
    epochs = rows(class_coverage=[1.0] * 5, val_acc=[0.95] * 5, teacher_pseudo_acc=[0.1, 0.1, 0.1, 0.15, 0.19])
    found = feed(health, epochs)
    assert [epoch for epoch, _ in found] == [5]  # judged from a quarter of the run on: epochs 4 and 5 of 10
    assert "pseudo-supervision is not in effect" in found[0][1] and "loss.eta" in found[0][1]


def test_an_unconditional_generator_has_no_pseudo_labels_to_miss(tiny_cfg):
    health = monitor(tiny_cfg, **{"generator.kind": "unconditional"})
    assert feed(health, rows(class_coverage=[1.0] * 4, val_acc=[0.95] * 4, teacher_pseudo_acc=[0.1] * 4)) == []


def test_the_monitor_resumes_with_its_streaks(tiny_cfg):
    health = monitor(tiny_cfg)
    feed(health, rows(class_coverage=[0.1, 0.1], val_acc=[0.1, 0.1], teacher_pseudo_acc=[0.9, 0.9]))
    resumed = monitor(tiny_cfg)
    resumed.load_state(health.state())
    third = {"epoch": 3, "class_coverage": 0.1, "val_acc": 0.1, "teacher_pseudo_acc": 0.9}
    assert [epoch for epoch, _ in feed(resumed, [third])] == [3]  # epoch 2's streak carried over


def test_a_run_that_learns_nothing_warns_in_its_summary(tiny_cfg, caplog):
    # Rates so small that neither network moves: the student predicts few classes, the generator's
    # images are noise to the teacher.
    cfg = with_values(tiny_cfg, {"train.epochs": 4, "student.lr": 1e-9, "generator.lr": 1e-9})
    with caplog.at_level(logging.WARNING, logger="cpsc_ray.runs.health"):
        summary, history = train_into(cfg, RootDir(cfg.output_dir).run("stuck"), "stuck", progress=False)
    assert len(summary["warnings"]) == 2, summary["warnings"]
    assert all(w in caplog.text for w in summary["warnings"])
    assert all(0 <= r["teacher_pseudo_acc"] <= 0.5 for r in history)


def test_a_healthy_run_stays_silent(tiny_cfg, caplog):
    # The digits default's epochs, 5 of them (the tiny fixture's budget is too small for the generator
    # to learn its classes, which the monitor rightly reports), at the default loss settings.
    cfg = with_values(
        tiny_cfg,
        {
            "train.epochs": 5,
            "train.iterations_per_epoch": 15,
            "train.batch_size": 128,
            "train.g_steps": 6,
            "train.s_steps": 5,
            "student.warmup_fraction": 0.1,
        },
    )
    with caplog.at_level(logging.WARNING, logger="cpsc_ray.runs.health"):
        summary, history = train_into(cfg, RootDir(cfg.output_dir).run("healthy"), "healthy", progress=False)
    # Five short epochs: the generator is still learning its classes, already well above the warning's 20%.
    assert summary["last"]["val_acc"] > 0.5 and history[-1]["teacher_pseudo_acc"] > 0.3
    assert summary["warnings"] == [] and "cpsc_ray.runs.health" not in caplog.text


def test_a_many_class_student_still_reaching_more_classes_has_not_collapsed(tiny_cfg):
    # The 100-class glyph row's first epochs (seed 0, defaults and unconditional): few classes, but more
    # than ever before in most epochs, above chance from the third.
    cfg = with_values(tiny_cfg, {"train.epochs": 16, "student.warmup_fraction": 0.02})

    def warned_at(coverage, val_acc):
        health = HealthMonitor(cfg, num_classes=100, selection="val_acc")
        epochs = rows(class_coverage=coverage, val_acc=val_acc, teacher_pseudo_acc=[0.3] * len(coverage))
        return [epoch for epoch, _ in feed(health, epochs)]

    defaults = [0.017, 0.0, 0.033, 0.057, 0.127, 0.297, 0.303]
    assert warned_at([0.08, 0.07, 0.17, 0.33, 0.41, 0.6, 0.63], defaults) == []
    assert warned_at([0.11, 0.21, 0.29, 0.27, 0.4, 0.41, 0.73], [0.013, 0.02, 0.037, 0.057, 0.117, 0.123, 0.387]) == []
    # The same student stuck at its epoch-3 classes has collapsed, and so has one that reaches more classes at chance.
    assert warned_at([0.08, 0.07, 0.17, 0.17, 0.15], defaults[:5]) == [5]
    assert warned_at([0.08, 0.1, 0.15, 0.2, 0.25], [0.01, 0.015, 0.01, 0.02, 0.01]) == [3]
