"""The engine: exact continuation after save/restore, a frozen teacher, hyperparameters that win
over restored optimizer state, divergence detection."""

from __future__ import annotations

import io
import math

import pytest
import torch

from cpsc_ray.config import with_values
from cpsc_ray.method.engine import DivergenceError
from cpsc_ray.method.schedules import multistep, warmup_cosine
from cpsc_ray.runs.assembly import prepare_engine


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_states_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_states_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("replay_images", [0, 48], ids=["fresh", "replay"])
def test_restore_continues_bit_identically(tiny_cfg, replay_images):
    # With a memory of past images (student.replay_images) the memory is state too.
    cfg = with_values(tiny_cfg, {"train.epochs": 3, "student.replay_images": replay_images})
    unbroken = prepare_engine(cfg).engine
    unbroken.train_epoch()
    saved = roundtrip(unbroken.state_dict())
    unbroken.train_epoch()
    unbroken.train_epoch()

    resumed = prepare_engine(cfg).engine
    resumed.load_state_dict(saved)
    assert resumed.epoch == 1
    resumed.train_epoch()
    last = resumed.train_epoch()

    a, b = resumed.state_dict(), unbroken.state_dict()
    a["counters"].pop("device_seconds"), b["counters"].pop("device_seconds")  # wall-clock, not state
    assert_states_equal(a, b)
    assert last["epoch"] == 3 and last["images"] == unbroken.images_synthesized


def test_teacher_is_frozen_and_never_saved(tiny_cfg):
    engine = prepare_engine(tiny_cfg).engine
    before = {k: v.clone() for k, v in engine.teacher.state_dict().items()}
    engine.train_epoch()
    assert not engine.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in engine.teacher.parameters())
    assert_states_equal(engine.teacher.state_dict(), before)  # running stats untouched too
    assert "teacher" not in engine.state_dict()


def test_projection_head_is_fixed_by_default_and_trained_on_request(tiny_cfg):
    fixed = prepare_engine(tiny_cfg).engine
    head_before = {k: v.clone() for k, v in fixed.synthesizer.head.state_dict().items()}
    fixed.train_epoch()
    assert_states_equal(fixed.synthesizer.head.state_dict(), head_before)

    trained = prepare_engine(with_values(tiny_cfg, {"loss.train_projection_head": True})).engine
    trained.train_epoch()
    assert any(not torch.equal(v, head_before[k]) for k, v in trained.synthesizer.head.state_dict().items())


def test_hyperparameters_win_over_restored_optimizer_state(tiny_cfg):
    source = prepare_engine(tiny_cfg).engine
    source.train_epoch()
    state = roundtrip(source.state_dict())
    perturbed = with_values(
        tiny_cfg, {"student.lr": 0.37, "generator.lr": 0.0021, "loss.alpha": 1.5, "loss.temperature": 0.2}
    )
    clone = prepare_engine(perturbed).engine
    clone.load_state_dict(state)
    progress = 1 / tiny_cfg.train.epochs
    expected_student = 0.37 * warmup_cosine(progress, tiny_cfg.student.warmup_fraction)
    expected_generator = 0.0021 * multistep(progress, tiny_cfg.generator.lr_milestones, tiny_cfg.generator.lr_gamma)
    assert math.isclose(clone.student_opt.param_groups[0]["lr"], expected_student)
    assert math.isclose(clone.synthesizer.optimizer.param_groups[0]["lr"], expected_generator)
    assert clone.student_loss.weights["ikd"] == 1.5 and clone.synthesizer.objective.weights["ikd"] == -1.5
    assert clone.synthesizer.objective.terms["scl"].temperature == 0.2
    assert_states_equal(clone.student.state_dict(), source.student.state_dict())


def test_model_shaping_keys_cannot_change_mid_run(tiny_cfg):
    engine = prepare_engine(tiny_cfg).engine
    with pytest.raises(ValueError, match="generator.nz"):
        engine.apply_hyperparameters(with_values(tiny_cfg, {"generator.nz": 3}))


def test_divergence_is_detected(tiny_cfg):
    engine = prepare_engine(with_values(tiny_cfg, {"student.lr": 1e6, "student.warmup_fraction": 0.0})).engine
    with pytest.raises(DivergenceError, match="epoch 1"):
        engine.train_epoch()


def test_epoch_metrics_name_every_term_and_count_images(tiny_cfg):
    # Without the adversarial warm-up, whose ramp would scale -KD and -IKD differently in every iteration.
    engine = prepare_engine(with_values(tiny_cfg, {"loss.adversarial_warmup": 0.0})).engine
    metrics = engine.train_epoch()
    t = tiny_cfg.train
    assert metrics["images"] == t.iterations_per_epoch * (t.g_steps + t.s_steps) * t.batch_size
    for name in ("g_kd", "g_ikd", "g_bn", "g_scl", "g_ce", "g_total", "s_kd", "s_ikd", "s_ce", "s_total"):
        assert math.isfinite(metrics[name]), name
    g = engine.cfg.loss
    expected_total = (
        -metrics["g_kd"]
        - g.alpha * metrics["g_ikd"]
        + g.beta * metrics["g_bn"]
        + g.gamma * metrics["g_scl"]
        + g.eta * metrics["g_ce"]
    )
    assert math.isclose(metrics["g_total"], expected_total, rel_tol=1e-4)


def test_ablation_weight_zero_leaves_term_out_of_metrics(tiny_cfg):
    engine = prepare_engine(with_values(tiny_cfg, {"loss.gamma": 0.0, "loss.beta": 0.0})).engine
    metrics = engine.train_epoch()
    assert metrics["g_scl"] is None and metrics["g_bn"] is None and metrics["g_kd"] is not None
    assert engine.synthesizer.bn_prior is None


def test_schedules():
    assert warmup_cosine(0.0, 0.1) == 0.0
    assert math.isclose(warmup_cosine(0.05, 0.1), 0.5)
    assert math.isclose(warmup_cosine(0.1, 0.1), 1.0)
    assert math.isclose(warmup_cosine(0.55, 0.1), 0.5)
    assert math.isclose(warmup_cosine(1.0, 0.1), 0.0, abs_tol=1e-12)
    assert multistep(0.05, [0.1, 0.3], 0.1) == 1.0
    assert math.isclose(multistep(0.2, [0.1, 0.3], 0.1), 0.1)
    assert math.isclose(multistep(0.9, [0.1, 0.3], 0.1), 0.01)


def spy_on_generator_updates(engine) -> list[tuple[float, list[torch.Tensor], list[torch.Tensor]]]:
    """(lr, gradients, parameter change) of every generator optimizer step."""
    optimizer = engine.synthesizer.optimizer
    records, step = [], optimizer.step

    def spy(*args, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        before = [p.detach().clone() for p in params]
        lr = optimizer.param_groups[0]["lr"]
        result = step(*args, **kwargs)
        records.append((lr, [p.grad.clone() for p in params], [p.detach() - b for p, b in zip(params, before)]))
        return result

    optimizer.step = spy
    return records


def sign_step_error(lr: float, grads: list[torch.Tensor], changes: list[torch.Tensor]) -> float:
    """Largest distance of an update from -lr * sign(grad), beyond what Adam's epsilon allows."""
    eps = 1e-8
    return max(
        ((change + lr * grad.sign()).abs() - lr * eps / (grad.abs() + eps)).max().item()
        for grad, change in zip(grads, changes)
    )


@pytest.mark.parametrize("dynamics", ["reference", "fixed"])
def test_reference_dynamics_make_each_generator_update_lr_sign_grad_at_a_constant_rate(digits_cfg, dynamics):
    # 2 epochs x 2 iterations x 2 generator steps; the fixed run keeps METHOD.md's milestones (50/600 and
    # 150/600 of the run), which fall after the first and second iterations.
    milestones = {"generator.lr_milestones": [50 / 600, 150 / 600]} if dynamics == "fixed" else {}
    cfg = with_values(digits_cfg, {"dynamics": dynamics, **milestones})
    engine = prepare_engine(cfg).engine
    records = spy_on_generator_updates(engine)
    engine.train_epoch()
    engine.train_epoch()
    assert len(records) == 8
    assert not torch.equal(records[0][1][0], records[1][1][0])  # the gradients differ between steps
    rates = [lr for lr, _, _ in records]
    errors = [sign_step_error(*record) for record in records]
    if dynamics == "reference":
        assert rates == [cfg.generator.lr] * 8
        assert max(errors) < 1e-6
    else:  # persistent Adam state and a decaying rate: the same check must fail
        assert rates[-1] < rates[0] / 50
        assert max(errors[1:]) > 1e-5


def test_term_gradients_leave_training_unchanged(tiny_cfg):
    plain = prepare_engine(tiny_cfg).engine
    measured = prepare_engine(with_values(tiny_cfg, {"eval.term_gradients": True})).engine
    plain.train_epoch()
    metrics = measured.train_epoch()
    for term in ("kd", "ikd", "bn", "scl", "ce"):
        assert metrics[f"g_grad_{term}"] > 0, term
    a, b = plain.state_dict(), measured.state_dict()
    a["counters"].pop("device_seconds"), b["counters"].pop("device_seconds")
    assert_states_equal(a, b)


def test_a_checkpoint_restores_where_fewer_gpus_are_visible(tiny_cfg, monkeypatch):
    """A state written where four GPUs were visible (Ray Train workers on one node see each other's)
    restores on a node that sees one: the engine takes what it needs, its own device's state."""
    engine = prepare_engine(tiny_cfg).engine
    engine.train_epoch()
    state = roundtrip(engine.state_dict())
    state["rng"]["cuda"] = [torch.ByteTensor(16).random_() for _ in range(4)]  # one per GPU seen then

    def set_rng_state_all(states):  # as CUDA does: a state per visible device, no more
        if len(states) > torch.cuda.device_count():
            raise RuntimeError(f"{len(states)} CUDA RNG states for {torch.cuda.device_count()} device(s)")

    restored = prepare_engine(tiny_cfg).engine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    restored.load_state_dict(state)
    assert restored.epoch == 1


def test_only_the_engines_own_cuda_rng_state_is_restored():
    from cpsc_ray.method.device import device_rng_state

    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]
    assert torch.equal(device_rng_state(states, torch.device("cuda", 2)), states[2])  # older, per-GPU checkpoints
    assert device_rng_state(states[:2], torch.device("cuda", 3)) is None  # that GPU is not seen: reseeded anyway
    assert device_rng_state(states[1], torch.device("cuda", 0)) is states[1]  # today's: the engine's device
    assert device_rng_state(states, torch.device("cpu")) is None
    assert device_rng_state(None, torch.device("cuda", 0)) is None


def test_the_generator_turns_adversarial_over_its_warm_up(tiny_cfg):
    # Two epochs of two iterations: progress 0, 1/4, 1/2, 3/4 at each iteration's start, so with a warm-up
    # of half the run the adversarial terms weigh 0, 1/2, then all of their weight; two generator steps each.
    engine = prepare_engine(with_values(tiny_cfg, {"loss.adversarial_warmup": 0.5})).engine
    objective, seen = engine.synthesizer.objective, []
    forward = objective.forward
    objective.forward = lambda batch: seen.append(dict(objective.weights)) or forward(batch)
    engine.train_epoch()
    engine.train_epoch()
    alpha = tiny_cfg.loss.alpha
    assert [(w["kd"], w["ikd"]) for w in seen] == [(-r, -alpha * r) for r in (0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0)]
    assert all(w["ce"] == tiny_cfg.loss.eta and w["bn"] == tiny_cfg.loss.beta for w in seen)
