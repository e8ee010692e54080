"""The synthesizer seam (method/synthesis.py): the student's step takes its batches from whichever synthesizer the
engine was given, and both implementations, CPSC-DFKD's generator and the probe's optimised batch, feed it."""

from __future__ import annotations

import math

import pytest
import torch

from cpsc_ray.config import LossConfig, with_values
from cpsc_ray.method.control import LIMIT, AgreementControl
from cpsc_ray.method.losses import BNStatisticsPrior
from cpsc_ray.method.synthesis import SYNTHESIZERS, GeneratorSynthesizer, OptimisedBatch, Setting
from cpsc_ray.runs.assembly import prepare_engine


def optimised_batch(cfg, setting: Setting) -> OptimisedBatch:
    spec, n = setting.spec, setting.local_batch
    labels = torch.arange(spec.num_classes).repeat(n // spec.num_classes + 1)[:n]
    images = torch.randn(n, spec.channels, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1))
    return OptimisedBatch(setting.teacher_fwd, images, labels, lr=0.05, prior=BNStatisticsPrior(setting.teacher))


def trained_on(engine) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor], dict]:
    """One epoch; what ``sample()`` gave, what the student's step trained on, and the epoch's metrics."""
    sampled, seen = [], []
    sample, student = engine.synthesizer.sample, engine.student_ddp

    def recorded_sample():
        images, labels = sample()
        sampled.append((images.clone(), labels.clone()))
        return images, labels

    def recorded_student(images):
        seen.append(images.clone())
        return student(images)

    engine.synthesizer.sample, engine.student_ddp = recorded_sample, recorded_student
    metrics = engine.train_epoch()
    return sampled, seen, metrics


def test_both_synthesizers_feed_the_same_student_step(tiny_cfg):
    cfg = with_values(tiny_cfg, {"train.epochs": 1})
    engines = {
        "generator": prepare_engine(cfg).engine,
        "optimised batch": prepare_engine(cfg, synthesizer=optimised_batch).engine,
    }
    assert isinstance(engines["generator"].synthesizer, GeneratorSynthesizer)
    assert isinstance(engines["optimised batch"].synthesizer, OptimisedBatch)
    steps = cfg.train.iterations_per_epoch * cfg.train.s_steps
    for name, engine in engines.items():
        before = [p.detach().clone() for p in engine.student.parameters()]
        sampled, seen, metrics = trained_on(engine)
        assert len(sampled) == len(seen) == steps, name
        assert all(torch.equal(images, batch) for (images, _), batch in zip(sampled, seen)), name
        assert any(not torch.equal(b, p) for b, p in zip(before, engine.student.parameters())), name
        for term in ("s_kd", "s_ce", "s_total", "g_total", "g_ce", "g_bn", "teacher_pseudo_acc"):
            assert math.isfinite(metrics[term]), (name, term)
    optimised = engines["optimised batch"]
    # The optimised batch made its images against the teacher's CE, the BN prior and smoothness, and kept them.
    assert set(optimised.synthesizer.objective.terms) == {"ce", "bn", "tv"} and math.isfinite(metrics["g_tv"])
    labels = optimised.synthesizer.labels
    assert all(torch.equal(y, labels) for _, y in sampled)


def test_optimised_batch_state_round_trips_through_the_engine(tiny_cfg):
    engine = prepare_engine(tiny_cfg, synthesizer=optimised_batch).engine
    engine.train_epoch()
    state = engine.state_dict()
    fresh = prepare_engine(tiny_cfg, synthesizer=optimised_batch).engine
    fresh.load_state_dict(state)
    assert torch.equal(fresh.synthesizer.images, engine.synthesizer.images)
    assert fresh.synthesizer.optimizer.state_dict()["state"][0]["step"] == 2 * tiny_cfg.train.g_steps
    images, labels = fresh.preview(per_class=1)
    assert labels.tolist() == list(range(engine.spec.num_classes)) and images.min() >= 0 and images.max() <= 1


def test_generator_kinds_are_the_registered_synthesizers(tiny_cfg):
    """The unconditional generator is a synthesizer of its own: the same step, a generator that ignores labels."""
    assert SYNTHESIZERS.names() == ["conditional", "unconditional"]
    conditional = prepare_engine(tiny_cfg).engine.synthesizer.generator
    unconditional = prepare_engine(with_values(tiny_cfg, {"generator.kind": "unconditional"})).engine
    assert conditional.conditional and not unconditional.synthesizer.generator.conditional
    z = torch.randn(4, tiny_cfg.generator.nz)
    generator = unconditional.synthesizer.generator.eval()
    zeros, ones = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(generator(z, zeros), generator(z, ones))


def test_the_agreement_target_steers_the_generators_ce_weight(tiny_cfg):
    """After each generator step the CE weight is eta * exp(log m), log m moved by rate * (target - that step's
    agreement) and kept within [-log 100, log 100]: checked step by step against the batches the steps saw."""
    eta, target, rate = 2.0, 0.75, 0.5
    cfg = with_values(tiny_cfg, {"loss.eta": eta, "loss.agreement_target": target, "loss.agreement_rate": rate})
    engine = prepare_engine(cfg).engine
    synthesizer = engine.synthesizer
    batches, make_batch = [], synthesizer.batch
    synthesizer.batch = lambda *args: batches.append(make_batch(*args)) or batches[-1]
    metrics = engine.train_epoch()
    assert len(batches) == cfg.train.iterations_per_epoch * cfg.train.g_steps
    log_m, used = 0.0, []
    for batch in batches:
        used.append(eta * math.exp(log_m))
        agreement = (batch.teacher_logits.argmax(1) == batch.labels).float().mean().item()
        log_m = min(max(log_m + rate * (target - agreement), -math.log(LIMIT)), math.log(LIMIT))
    assert len({round(w, 4) for w in used}) > 1  # the weight moved
    assert metrics["g_ce_weight"] == pytest.approx(sum(used) / len(used), rel=1e-5)
    assert synthesizer.objective.weights["ce"].item() == pytest.approx(eta * math.exp(log_m), rel=1e-5)
    # A checkpoint carries the multiplier: the restored run steps on from the same weight.
    restored = prepare_engine(cfg).engine
    assert float(restored.synthesizer.objective.weights["ce"]) == eta
    restored.load_state_dict(engine.state_dict())
    restored.apply_hyperparameters(cfg)
    assert restored.synthesizer.objective.weights["ce"].item() == pytest.approx(eta * math.exp(log_m), rel=1e-5)


def test_the_agreement_multiplier_is_bounded():
    control, cfg = AgreementControl(torch.device("cpu")), LossConfig(agreement_target=0.9, agreement_rate=1.0)
    for _ in range(20):
        control.update(torch.tensor(0.0), cfg)  # the teacher never agrees: up 0.9 a step, to the bound
    assert control.multiplier.item() == pytest.approx(LIMIT)
    for _ in range(100):
        control.update(torch.tensor(1.0), cfg)  # it always agrees: down 0.1 a step, to the other bound
    assert control.multiplier.item() == pytest.approx(1 / LIMIT)
