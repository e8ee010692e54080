"""CPSC-DFKD's loss terms as small objects, and the weighted sums of METHOD.md built from them.

Generator: L_G = -r * a * (KD(s, t) + alpha * IKD) + beta * BN + gamma * SCL + eta * CE(t, y)
Student:   L_S =  KD(s, t) + alpha * IKD + eta_student * CE(s, y)

METHOD.md's one ``eta`` is two weights here; ``a`` (``loss.adversarial``, 1 in METHOD.md) turns the
generator's adversarial terms off for ablations, and ``r`` ramps them in over
``loss.adversarial_warmup`` of the run (the engine sets it), so the generator learns its classes before it
turns adversarial. With ``loss.gate_pseudo_labels`` the student's CE counts only the images the teacher
assigns to their pseudo-label: a label the image does not show would teach the student noise.

A term whose weight is 0 is not computed at all: that is how ablations run, and it is also why
the engine asks for features only when the contrastive term is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from cpsc_ray.config import LossConfig


@dataclass
class SynthBatch:
    """What the loss terms look at for one synthetic batch ``x`` (``G(z, y)``, or optimised images)."""

    labels: Tensor
    teacher_logits: Tensor
    student_logits: Tensor | None = None
    teacher_features: Tensor | None = None
    student_features: Tensor | None = None  # already projected to the teacher's width
    images: Tensor | None = None  # for priors on the images themselves


def total_variation(images: Tensor) -> Tensor:
    """Mean absolute difference between vertical, plus between horizontal, neighbours: a smoothness prior."""
    return (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean() + (
        images[:, :, :, 1:] - images[:, :, :, :-1]
    ).abs().mean()


def kd_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float | None = None) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)), batch mean, times T^2 so gradients keep their scale."""
    scale = temperature or 1.0
    log_p_student = F.log_softmax(student_logits.float() / scale, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / scale, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * scale**2


def logit_distance(student_logits: Tensor, teacher_logits: Tensor, form: str) -> Tensor:
    """IKD's L2 logit term; the teacher side is detached, as in the reference code.

    ``mse``: mean squared error. ``log_mse``: log of it (the reference generator's CIFAR-10 form).
    ``log_norm``: log of the Frobenius norm of the difference (the reference student's CIFAR-10 form).
    """
    diff = student_logits.float() - teacher_logits.detach().float()
    if form == "mse":
        return diff.pow(2).mean()
    if form == "log_mse":
        return diff.pow(2).mean().log()
    if form == "log_norm":
        return diff.norm().log()
    raise ValueError(f"unknown logit distance form {form!r}")


def supervised_contrastive(features: Tensor, labels: Tensor, temperature: float, base_temperature: float) -> Tensor:
    """SupCon (Khosla et al. 2020), contrast mode 'all'.

    ``features``: ``[N, views, D]``, L2-normalised. Every one of the N*views embeddings is an anchor;
    its positives are the other embeddings with the same label (its own other views included).
    """
    n, views, _ = features.shape
    embeddings = features.transpose(0, 1).reshape(n * views, -1).float()
    all_labels = labels.repeat(views)
    is_self = torch.eye(n * views, dtype=torch.bool, device=features.device)
    similarity = (embeddings @ embeddings.T / temperature).masked_fill(is_self, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positive = (all_labels[:, None] == all_labels[None, :]) & ~is_self
    mean_log_prob_positive = log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1)
    return -(temperature / base_temperature) * mean_log_prob_positive.mean()


class LossTerm(nn.Module):
    """A named scalar loss on one synthetic batch."""

    needs_features = False

    def forward(self, batch: SynthBatch) -> Tensor:
        raise NotImplementedError


class KDTerm(LossTerm):
    def __init__(self, temperature: float | None = None):
        super().__init__()
        self.temperature = temperature

    def forward(self, batch: SynthBatch) -> Tensor:
        return kd_divergence(batch.student_logits, batch.teacher_logits, self.temperature)


class LogitL2Term(LossTerm):
    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, batch: SynthBatch) -> Tensor:
        return logit_distance(batch.student_logits, batch.teacher_logits, self.form)


class PseudoLabelCETerm(LossTerm):
    """Cross-entropy against the pseudo-labels the generator was conditioned on.

    ``gated``: only images the teacher assigns to their pseudo-label count (the others add zero to the
    batch mean). ``of="logits"`` is the method as written. ``of="probabilities"`` reproduces the reference code,
    which applies it to softmax outputs: inputs in [0, 1] confine the loss to a range of width 1
    (``log(K - 1 + e) - 1`` to ``log(K - 1 + e)``) with small gradients, so its weight buys little there.
    """

    def __init__(self, on: str, of: str = "logits", gated: bool = False):
        super().__init__()
        self.gated = gated
        if on not in ("teacher", "student"):
            raise ValueError(f"on must be 'teacher' or 'student', got {on!r}")
        if of not in ("logits", "probabilities"):
            raise ValueError(f"of must be 'logits' or 'probabilities', got {of!r}")
        self.on, self.of = on, of

    def forward(self, batch: SynthBatch) -> Tensor:
        logits = (batch.teacher_logits if self.on == "teacher" else batch.student_logits).float()
        inputs = logits.softmax(dim=1) if self.of == "probabilities" else logits
        if not self.gated:
            return F.cross_entropy(inputs, batch.labels)
        # Per image, so a batch the teacher mostly disagrees with pulls the student little.
        return (F.cross_entropy(inputs, batch.labels, reduction="none") * teacher_agrees(batch).float()).mean()


def teacher_agrees(batch: SynthBatch) -> Tensor:
    """Which images the teacher assigns to the class they were generated for."""
    return batch.teacher_logits.argmax(1) == batch.labels


class TotalVariationTerm(LossTerm):
    def forward(self, batch: SynthBatch) -> Tensor:
        return total_variation(batch.images)


Gather = Callable[[Tensor], Tensor]


class ContrastiveTerm(LossTerm):
    """Pseudo-supervised contrast: the teacher's and the student's features of one image are two views.
    ``instances``: no image shares a class with another (instance discrimination).

    ``gather`` (distributed runs) concatenates features and labels from every rank with autograd,
    so positives and negatives come from the whole global batch. ``gated``: an image the teacher does not
    assign to its pseudo-label has no positive but its own other view.
    """

    needs_features = True

    def __init__(
        self,
        temperature: float,
        base_temperature: float,
        gather: Gather | None = None,
        gated: bool = False,
        instances: bool = False,
    ):
        super().__init__()
        self.temperature, self.base_temperature = temperature, base_temperature
        self.gather = gather
        self.gated, self.instances = gated, instances

    def forward(self, batch: SynthBatch) -> Tensor:
        views = torch.stack(
            [F.normalize(batch.student_features.float(), dim=1), F.normalize(batch.teacher_features.float(), dim=1)],
            dim=1,
        )
        if self.instances:
            labels = torch.full_like(batch.labels, -1)
        elif self.gated:
            labels = torch.where(teacher_agrees(batch), batch.labels, -1)
        else:
            labels = batch.labels
        if self.gather is not None:
            views, labels = self.gather(views), self.gather(labels)
        if self.gated or self.instances:  # each image marked -1 (on any rank) becomes a class of its own
            labels = torch.where(labels < 0, -1 - torch.arange(len(labels), device=labels.device), labels)
        return supervised_contrastive(views, labels, self.temperature, self.base_temperature)


StatsReduce = Callable[[Tensor], Tensor]


class ChannelMoments(torch.autograd.Function):
    """Per-channel mean and mean of squares of a feature map, with a one-kernel backward.

    Autograd's version of ``x.mean`` plus ``(x * x).mean`` makes several passes over every
    activation in the backward; this one makes one (measured 3-5x faster on CPU, either layout).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x)
        count = x.numel() // x.shape[1]
        return x.sum(dim=(0, 2, 3)) / count, torch.linalg.vector_norm(x, dim=(0, 2, 3)).square() / count

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_mean_square: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        count = x.numel() // x.shape[1]
        return torch.addcmul((grad_mean / count).view(1, -1, 1, 1), x, (2 * grad_mean_square / count).view(1, -1, 1, 1))


class BNStatisticsPrior(LossTerm):
    """DeepInversion's prior: for every BatchNorm2d of the frozen teacher, the L2 distance between the
    batch mean/variance of the layer's input and its running mean/variance.

    ``form="raw"`` sums those distances over layers, as DeepInversion and the reference code do; its
    scale grows with the teacher's depth, width and activation scale (its gradient at the generator was
    26x to 140x the pseudo-label CE's for a 20-BN ResNet-18, about 1x for a 3-BN CNN, on the same digits).
    ``form="standardized"`` measures each layer's distance in units of its running statistics (mean
    difference over the running std, variance difference over the running variance) and averages over
    layers, so its pull does not grow with the teacher's depth (BENCHMARKS.md, issue 9).

    Forward hooks record the statistics only inside ``capture()``; ``forward`` turns them into the loss.
    ``reduce`` (distributed runs) averages the per-rank [mean, mean of squares] across ranks with
    autograd in one collective, so the statistics are those of the global batch.
    """

    def __init__(self, teacher: nn.Module, reduce: StatsReduce | None = None, form: str = "raw"):
        super().__init__()
        if form not in ("raw", "standardized"):
            raise ValueError(f"form must be 'raw' or 'standardized', got {form!r}")
        self.form = form
        self.layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(
                "the teacher has no BatchNorm2d layers, so the BN-statistics prior has nothing to match; "
                "set loss.beta=0 for this teacher"
            )
        self.reduce = reduce
        self._recording = False
        self._means: list[Tensor] = []
        self._mean_squares: list[Tensor] = []
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self._recording:
            with torch.autocast(inputs[0].device.type, enabled=False):
                mean, mean_square = ChannelMoments.apply(inputs[0].float())
            self._means.append(mean)
            self._mean_squares.append(mean_square)

    def capture(self) -> "_Capture":
        return _Capture(self)

    def forward(self, batch: SynthBatch | None = None) -> Tensor:
        if len(self._means) != len(self.layers):
            raise RuntimeError(
                f"BN prior saw {len(self._means)} of {len(self.layers)} layers: run the teacher inside capture()"
            )
        means, mean_squares = torch.cat(self._means), torch.cat(self._mean_squares)
        self._means, self._mean_squares = [], []
        if self.reduce is not None:
            means, mean_squares = self.reduce(torch.cat([means, mean_squares])).chunk(2)
        variances = mean_squares - means * means
        total = means.new_zeros(())
        for layer, mean, var in zip(self.layers, means.split(self._widths), variances.split(self._widths)):
            mean_gap, var_gap = mean - layer.running_mean, var - layer.running_var
            if self.form == "standardized":
                running_var = layer.running_var + layer.eps
                mean_gap, var_gap = mean_gap / running_var.sqrt(), var_gap / running_var
            total = total + torch.linalg.vector_norm(var_gap) + torch.linalg.vector_norm(mean_gap)
        return total / len(self.layers) if self.form == "standardized" else total

    @property
    def _widths(self) -> list[int]:
        return [layer.num_features for layer in self.layers]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _Capture:
    def __init__(self, prior: BNStatisticsPrior):
        self.prior = prior

    def __enter__(self) -> BNStatisticsPrior:
        self.prior._means, self.prior._mean_squares = [], []
        self.prior._recording = True
        return self.prior

    def __exit__(self, *exc) -> None:
        self.prior._recording = False


class WeightedSum(nn.Module):
    """``sum(weight * term)`` over the terms whose weight is not zero; also returns each term's value."""

    def __init__(self, terms: dict[str, tuple[float, LossTerm]]):
        super().__init__()
        self.base_weights = {name: weight for name, (weight, _) in terms.items() if weight != 0}
        self.weights = dict(self.base_weights)
        self.terms = nn.ModuleDict({name: term for name, (weight, term) in terms.items() if weight != 0})

    def scale(self, names: tuple[str, ...], factor: float | Tensor) -> None:
        """Weigh the named terms (those that are on) by ``factor`` times their configured weight (a 0-d tensor
        factor stays on the device: ``loss.agreement_target``'s multiplier)."""
        for name in names:
            if name in self.weights:
                self.weights[name] = factor * self.base_weights[name]

    @property
    def needs_features(self) -> bool:
        return any(term.needs_features for term in self.terms.values())

    def forward(self, batch: SynthBatch) -> tuple[Tensor, dict[str, Tensor]]:
        values = {}
        for name, term in self.terms.items():
            with record_function(f"loss/{name}"):  # one label per term, for benchmarks/step_profile.py
                values[name] = term(batch)
        total = sum(self.weights[name] * value for name, value in values.items())
        return total, {name: value.detach() for name, value in values.items()}


ADVERSARIAL_TERMS = ("kd", "ikd")  # the generator's terms that ramp in over loss.adversarial_warmup


def generator_objective(
    cfg: LossConfig, bn_prior: BNStatisticsPrior | None, gather: Gather | None = None
) -> WeightedSum:
    ikd_form = "log_mse" if cfg.ikd_form == "log" else "mse"
    terms: dict[str, tuple[float, LossTerm]] = {
        "kd": (-cfg.adversarial, KDTerm(cfg.kd_temperature)),
        "ikd": (-cfg.adversarial * cfg.alpha, LogitL2Term(ikd_form)),
        "scl": (
            cfg.gamma,
            ContrastiveTerm(cfg.temperature, cfg.base_temperature, gather, cfg.gate_contrast, cfg.contrast_instances),
        ),
        "ce": (cfg.eta, PseudoLabelCETerm("teacher", cfg.ce_on)),
    }
    if cfg.beta != 0:
        if bn_prior is None:
            raise ValueError("loss.beta > 0 needs the teacher's BN-statistics prior")
        terms["bn"] = (cfg.beta, bn_prior)
    return WeightedSum(terms)


def student_objective(cfg: LossConfig) -> WeightedSum:
    ikd_form = "log_norm" if cfg.ikd_form == "log" else "mse"
    return WeightedSum(
        {
            "kd": (1.0, KDTerm(cfg.kd_temperature)),
            "ikd": (cfg.alpha, LogitL2Term(ikd_form)),
            "ce": (cfg.eta_student, PseudoLabelCETerm("student", cfg.ce_on, gated=cfg.gate_pseudo_labels)),
        }
    )
