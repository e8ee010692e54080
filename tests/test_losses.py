"""Every loss term against a value computed by hand (pure-Python arithmetic, stored here), and the
weighted sums' behaviour: zero weights skip work, gradients reach the generator, never the teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cpsc_ray.config import LossConfig
from cpsc_ray.method.generators import build_generator
from cpsc_ray.method.losses import (
    ADVERSARIAL_TERMS,
    BNStatisticsPrior,
    ChannelMoments,
    ContrastiveTerm,
    LossTerm,
    SynthBatch,
    WeightedSum,
    generator_objective,
    kd_divergence,
    logit_distance,
    student_objective,
    supervised_contrastive,
)
from cpsc_ray.method.models import build_model
from cpsc_ray.method.schedules import ramp

S = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
T = torch.tensor([[3.0, 2.0, 1.0], [0.5, 0.0, 0.0]])
Y = torch.tensor([2, 0])


def close(value: torch.Tensor, expected: float) -> bool:
    return math.isclose(value.item(), expected, rel_tol=1e-5, abs_tol=1e-6)


def test_kd_is_teacher_to_student_kl_batch_mean():
    assert close(kd_divergence(S[:1], T[:1]), 1.1504207652088825)
    assert close(kd_divergence(S, T), 0.6796757358004483)


def test_kd_temperature_scales_softmax_and_multiplies_by_t_squared():
    assert close(kd_divergence(S[:1], T[:1], temperature=4.0), 1.3196299121538528)


@pytest.mark.parametrize(
    "form, expected", [("mse", 1.5416666666666667), ("log_mse", 0.4328640822962789), ("log_norm", 1.1123117757621668)]
)
def test_logit_distance_forms(form, expected):
    assert close(logit_distance(S, T, form), expected)


def test_pseudo_label_ce_is_on_logits_not_probabilities():
    batch = SynthBatch(labels=Y, teacher_logits=T, student_logits=S)
    ce = student_objective(LossConfig(alpha=0, eta_student=1.0, gate_pseudo_labels=False)).terms["ce"](batch)
    assert close(ce, 0.9795253391882158)


def test_the_gated_pseudo_label_ce_counts_only_images_the_teacher_assigns_to_their_label():
    # The teacher's argmax is (0, 0) against pseudo-labels (2, 0): only the second row counts, and the
    # batch mean divides by both rows. By hand: CE([0, 0, 1], 0) / 2 = log(2 + e) / 2.
    batch = SynthBatch(labels=Y, teacher_logits=T, student_logits=S)
    ce = student_objective(LossConfig(alpha=0, eta_student=1.0, gate_pseudo_labels=True)).terms["ce"](batch)
    assert close(ce, 0.7757223569660254)
    nobody = SynthBatch(labels=torch.tensor([1, 1]), teacher_logits=T, student_logits=S)
    assert student_objective(LossConfig(eta_student=1.0)).terms["ce"](nobody).item() == 0


def test_pseudo_label_ce_on_probabilities_is_the_reference_double_softmax():
    # By hand: -p_y + log(sum_j exp(p_j)) with p = softmax(logits), averaged over the two rows.
    batch = SynthBatch(labels=Y, teacher_logits=T, student_logits=S)
    cfg = LossConfig(alpha=0, eta_student=1.0, gate_pseudo_labels=False, ce_on="probabilities")
    ce = student_objective(cfg).terms["ce"](batch)
    assert close(ce, 1.0162330071087875)


@pytest.mark.parametrize(
    "temperature, base_temperature, expected",
    # By hand (pure Python): minus the mean over the 6 anchors of the mean log-probability of their
    # positives at the temperature, times temperature / base_temperature.
    [(0.5, 0.5, 1.4701012776145073), (0.2, 0.07, 5.993376215933375)],
)
def test_supervised_contrastive_against_hand_computation(temperature, base_temperature, expected):
    student = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    teacher = torch.nn.functional.normalize(torch.tensor([[0.6, 0.8], [-1.0, 0.0], [1.0, -0.5]]), dim=1)
    features = torch.stack([student, teacher], dim=1)
    loss = supervised_contrastive(features, torch.tensor([0, 1, 0]), temperature, base_temperature)
    assert close(loss, expected)


def test_the_gated_contrast_gives_an_image_the_teacher_does_not_assign_to_its_label_no_positive_but_itself():
    # Pseudo-labels (0, 1, 0); the teacher assigns the third image to class 2, so it becomes a class of its
    # own. By hand (pure Python, as above) with labels (0, 1, -3) at temperature 0.5: 1.6785264713953822.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.6, 0.8], [-1.0, 0.0], [1.0, -0.5]])
    batch = SynthBatch(torch.tensor([0, 1, 0]), torch.eye(3) * 5, torch.zeros(3, 3), teacher, student)
    assert close(ContrastiveTerm(0.5, 0.5, gated=True)(batch), 1.6785264713953822)
    assert close(ContrastiveTerm(0.5, 0.5, gated=False)(batch), 1.4701012776145073)


def test_the_instance_contrast_gives_every_image_no_positive_but_itself():
    # The teacher assigns every image to its pseudo-label (0, 1, 0), so SupCon, gated or not, pairs the first and
    # the third; over instances no image has a positive but its other view: the labels (0, 1, 2) by hand.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.6, 0.8], [-1.0, 0.0], [1.0, -0.5]])
    agreeing = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0]])
    batch = SynthBatch(torch.tensor([0, 1, 0]), agreeing, torch.zeros(3, 3), teacher, student)
    assert close(ContrastiveTerm(0.5, 0.5, gated=True)(batch), 1.4701012776145073)
    assert close(ContrastiveTerm(0.5, 0.5, instances=True)(batch), 1.6785264713953822)
    cfg = LossConfig(temperature=0.5, base_temperature=0.5, beta=0, contrast_instances=True)
    assert close(generator_objective(cfg, None).terms["scl"](batch), 1.6785264713953822)


def test_contrastive_term_normalises_features():
    student = torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    teacher = torch.tensor([[0.6, 0.8], [-4.0, 0.0], [2.0, -1.0]])
    batch = SynthBatch(torch.tensor([0, 1, 0]), T, S, teacher_features=teacher, student_features=student)
    term = generator_objective(LossConfig(temperature=0.5, base_temperature=0.5, beta=0), None).terms["scl"]
    assert close(term(batch), 1.4701012776145073)


def test_contrastive_term_keeps_the_base_temperature_at_007_by_default():
    # The reference and SupCon keep 0.07 whatever the temperature: the loss scales by T / 0.07.
    student = torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    teacher = torch.tensor([[0.6, 0.8], [-4.0, 0.0], [2.0, -1.0]])
    batch = SynthBatch(torch.tensor([0, 1, 0]), T, S, teacher_features=teacher, student_features=student)
    term = generator_objective(LossConfig(temperature=0.5, beta=0), None).terms["scl"]
    assert close(term(batch), 1.4701012776145073 * 0.5 / 0.07)


def test_bn_prior_against_hand_computation():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5]))
    model = nn.Sequential(bn)
    x = torch.tensor([[[[1.0, 2.0]], [[0.0, -2.0]]], [[[3.0, 6.0]], [[1.0, -3.0]]]])
    prior = BNStatisticsPrior(model)
    with prior.capture():
        model(x)
    assert close(prior(), 5.0)


class TwoBranches(nn.Module):
    """Two BN layers that see the same input; the second's running statistics are the batch's own."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.BatchNorm2d(2).eval(), nn.BatchNorm2d(2).eval()
        self.a.running_mean.copy_(torch.tensor([0.5, -1.0]))
        self.a.running_var.copy_(torch.tensor([2.0, 0.5]))
        self.b.running_mean.copy_(torch.tensor([3.0, -1.0]))
        self.b.running_var.copy_(torch.tensor([3.5, 2.5]))

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_standardized_bn_prior_against_hand_computation():
    # Layer a, channel by channel: batch mean (3, -1), variance (3.5, 2.5). Mean gaps over the running
    # std: (2.5 / sqrt(2 + 1e-5), 0); variance gaps over the running variance: (1.5 / 2.00001, 2 / 0.50001).
    # Layer b matches exactly. The prior is the mean over both layers of the two L2 norms' sum.
    model = TwoBranches()
    x = torch.tensor([[[[1.0, 2.0]], [[0.0, -2.0]]], [[[3.0, 6.0]], [[1.0, -3.0]]]])
    for form, expected in (("standardized", 2.9186941816622824), ("raw", 5.0)):
        prior = BNStatisticsPrior(model, form=form)
        with prior.capture():
            model(x)
        assert close(prior(), expected), form
        prior.close()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channel_moments_values_and_gradient(memory_format):
    x = torch.randn(3, 4, 5, 2, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_(True)
    mean, mean_square = ChannelMoments.apply(x)
    assert torch.allclose(mean, x.mean(dim=(0, 2, 3))) and torch.allclose(mean_square, (x * x).mean(dim=(0, 2, 3)))
    assert torch.autograd.gradcheck(ChannelMoments.apply, (x,))


def test_bn_prior_hooks_record_only_inside_capture_and_are_removable():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
    prior = BNStatisticsPrior(model)
    model(torch.randn(2, 1, 3, 3))
    with pytest.raises(RuntimeError, match="capture"):
        prior()
    prior.close()
    assert not model[1]._forward_hooks


def test_bn_prior_needs_batchnorm():
    with pytest.raises(ValueError, match="loss.beta=0"):
        BNStatisticsPrior(nn.Sequential(nn.Conv2d(1, 2, 1)))


class Exploding(LossTerm):
    def forward(self, batch):
        raise AssertionError("a zero-weight term must not be computed")


def test_zero_weight_terms_are_not_computed():
    total_weighted = WeightedSum({"a": (2.0, student_objective(LossConfig()).terms["kd"]), "b": (0.0, Exploding())})
    total, parts = total_weighted(SynthBatch(Y, T, S))
    assert set(parts) == {"a"}
    assert close(total, 2 * 0.6796757358004483)


def test_contrast_off_means_no_features_needed():
    assert generator_objective(LossConfig(beta=0), None).needs_features
    assert not generator_objective(LossConfig(beta=0, gamma=0), None).needs_features


def test_weights_follow_method_md_signs():
    cfg = LossConfig(alpha=5, beta=1, gamma=0.7, eta=0.7, eta_student=0.3)
    prior = BNStatisticsPrior(nn.Sequential(nn.BatchNorm2d(1)))
    g = generator_objective(cfg, prior)
    assert g.weights == {"kd": -1.0, "ikd": -5.0, "scl": 0.7, "ce": 0.7, "bn": 1.0}
    assert student_objective(cfg).weights == {"kd": 1.0, "ikd": 5.0, "ce": 0.3}
    g.scale(ADVERSARIAL_TERMS, 0.25)  # a quarter of the way through the adversarial warm-up
    assert g.weights == {"kd": -0.25, "ikd": -1.25, "scl": 0.7, "ce": 0.7, "bn": 1.0}
    calm = generator_objective(cfg.model_copy(update={"adversarial": 0.0}), prior)
    calm.scale(ADVERSARIAL_TERMS, 0.5)
    assert calm.weights == {"scl": 0.7, "ce": 0.7, "bn": 1.0}  # not computed at all
    assert generator_objective(cfg.model_copy(update={"adversarial": 0.5}), prior).weights["ikd"] == -2.5


@pytest.mark.parametrize(
    "progress, fraction, expected", [(0.0, 0.25, 0.0), (0.1, 0.25, 0.4), (0.25, 0.25, 1.0), (0.9, 0.25, 1.0), (0, 0, 1)]
)
def test_the_adversarial_ramp(progress, fraction, expected):
    assert math.isclose(ramp(progress, fraction), expected)


@pytest.mark.parametrize("term", ["kd", "ikd", "bn", "scl", "ce"])
def test_each_generator_term_reaches_the_generator_and_never_the_teacher(term):
    torch.manual_seed(0)
    teacher = build_model("digits_teacher", 10, 1).eval().requires_grad_(False)
    student = build_model("digits_student", 10, 1).requires_grad_(False)
    head = nn.Linear(student.feature_dim, teacher.feature_dim).requires_grad_(False)
    generator = build_generator("upsample", 8, 4, 1, 16, 10)
    weights = {"alpha": 0.0, "beta": 0.0, "gamma": 0.0, "eta": 0.0}
    weights.update(
        {"ikd": {"alpha": 1.0}, "bn": {"beta": 1.0}, "scl": {"gamma": 1.0}, "ce": {"eta": 1.0}}.get(term, {})
    )
    prior = BNStatisticsPrior(teacher)
    objective = generator_objective(LossConfig(**weights), prior)
    if term != "kd":
        objective = WeightedSum({term: (1.0, objective.terms[term])})
    z, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    images = generator(z, y)
    with prior.capture():
        t_logits, t_features = teacher(images, return_features=True)
    s_logits, s_features = student(images, return_features=True)
    total, _ = objective(SynthBatch(y, t_logits, s_logits, t_features, head(s_features)))
    total.backward()
    grads = [p.grad for p in generator.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum().item() for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.parameters())
