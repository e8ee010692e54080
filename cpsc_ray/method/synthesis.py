"""The synthesizer seam: what makes the images the student learns from (Fast-Datafree's ``synthesize()`` and
``sample()``). Per iteration the engine calls ``synthesize()`` ``g_steps`` times, each a step that improves what
makes the images, then takes ``s_steps`` batches from ``sample()`` for the student; the student's step sees only
those batches. A new way to make images (a memory bank of past batches, another generator, a batch optimised
DeepInversion-style) is a new ``Synthesizer``, registered under the ``generator.kind`` that names it.

``GeneratorSynthesizer`` is CPSC-DFKD's: a generator, conditional (the method, ``generator.kind=conditional``) or
unconditional (the labels ignored), trained against the teacher and the student. ``OptimisedBatch`` optimises the images
themselves against the teacher alone, DeepInversion-style: the probe set is made so (``runs.probe``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from cpsc_ray.config import Config
from cpsc_ray.method.control import AgreementControl
from cpsc_ray.method.device import compiled
from cpsc_ray.method.generators import build_generator
from cpsc_ray.method.losses import (
    ADVERSARIAL_TERMS,
    BNStatisticsPrior,
    LossTerm,
    PseudoLabelCETerm,
    SynthBatch,
    TotalVariationTerm,
    WeightedSum,
    generator_objective,
    teacher_agrees,
)
from cpsc_ray.method.parallel import average, average_with_grad, gather_with_grad, noise_seed, world
from cpsc_ray.method.schedules import multistep, ramp
from cpsc_ray.method.spec import ImageSpec
from cpsc_ray.registry import Registry


@dataclass(frozen=True)
class Setting:
    """What a synthesizer makes images for: the frozen teacher and the student (their forward passes, compiled when
    the run compiles), the images' spec and this rank's batch size, where they run."""

    teacher: nn.Module
    teacher_fwd: Callable[..., Any]
    student: nn.Module
    student_fwd: Callable[..., Any]
    spec: ImageSpec
    local_batch: int
    device: torch.device
    memory_format: torch.memory_format
    autocast: Callable[[], AbstractContextManager]


class Synthesizer(Protocol):
    optimizer: torch.optim.Optimizer  # what ``synthesize`` steps; its learning rate is the run's ``lr_generator``
    objective: WeightedSum  # what ``synthesize`` minimises, term by term

    def synthesize(self) -> dict[str, Tensor]:
        """One step that improves what makes the images; its objective's terms by name, ``total`` among them."""

    def sample(self) -> tuple[Tensor, Tensor]:
        """A batch for the student (the engine calls it under ``no_grad``): images in the teacher's input space and
        their pseudo-labels."""

    def begin_epoch(self, epoch: int) -> None:
        """Called before epoch ``epoch`` (0-based) trains."""

    def schedule(self, progress: float) -> None:
        """Put the learning rate and loss scales of this point of the run (0 at the start, 1 at the end) in effect."""

    def apply_hyperparameters(self, cfg: Config) -> None:
        """Put a (possibly perturbed) config in effect; called after ``load_state_dict`` too."""

    def diagnostics(self, epochs_done: int) -> dict[str, float]:
        """Opt-in measurements at the end of an epoch (``eval.term_gradients``), by metric name."""

    def preview(self, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
        """Up to ``per_class`` images of every class (class-major) and their labels, for viewing."""

    def state_dict(self) -> dict[str, Any]:
        """Its part of the engine's state, by top-level key."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


SynthesizerBuilder = Callable[[Config, Setting], Synthesizer]
# generator.kind -> how the engine builds its synthesizer.
SYNTHESIZERS: Registry[SynthesizerBuilder] = Registry("synthesizer")


class ProjectionHead(nn.Module):
    """Maps student features to the teacher's width for the contrastive loss (an MLP, as in the reference)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class GeneratorSynthesizer:
    """CPSC-DFKD's synthesis: a generator ``G(z, y)`` trained by Adam on the generator objective, each step on fresh
    noise ``z`` and pseudo-labels ``y`` from this rank's stream (``z`` is never optimised); the student's batches are
    ``G(z, y)`` of fresh draws from the same stream. With ``loss.train_projection_head`` the projection head is trained
    with the generator."""

    def __init__(self, cfg: Config, setting: Setting, conditional: bool = True):
        self.cfg, self.setting = cfg, setting
        spec, device = setting.spec, setting.device
        self.rank, self.world_size = world()
        self.generator = build_generator(
            cfg.generator.arch, cfg.generator.nz, cfg.generator.ngf, spec.channels, spec.image_size, spec.num_classes,
            conditional,
        ).to(device, memory_format=setting.memory_format)  # fmt: skip
        teacher_dim = _feature_dim(setting.teacher, spec, device)
        student_dim = setting.student.feature_dim
        self.head = ProjectionHead(student_dim, teacher_dim).to(device) if student_dim != teacher_dim else None
        trains_head = self.head is not None and cfg.loss.train_projection_head
        if self.head is not None and not trains_head:
            self.head.requires_grad_(False)
        params = list(self.generator.parameters()) + (list(self.head.parameters()) if trains_head else [])
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.Adam(
            params, lr=cfg.generator.lr, betas=(cfg.generator.beta1, cfg.generator.beta2), **fused
        )
        self.generator_ddp: nn.Module = self.generator
        self.head_ddp: nn.Module | None = self.head
        if self.world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            # The generator's running statistics are never used (it always generates in train mode).
            self.generator_ddp = DistributedDataParallel(self.generator, device_ids=device_ids, broadcast_buffers=False)
            if trains_head:
                self.head_ddp = DistributedDataParallel(self.head, device_ids=device_ids)
        self.generator_ddp = compiled(self.generator_ddp, cfg.train)
        self.noise = torch.Generator(device=device)
        self.bn_prior: BNStatisticsPrior | None = None  # made by apply_hyperparameters once beta > 0
        self.control: AgreementControl | None = None  # made by apply_hyperparameters once agreement_target > 0

    def apply_hyperparameters(self, cfg: Config) -> None:
        self.cfg = cfg
        if cfg.loss.beta and self.bn_prior is None:
            reduce = average_with_grad if self.world_size > 1 else None
            self.bn_prior = BNStatisticsPrior(self.setting.teacher, reduce)
        if self.bn_prior is not None:
            self.bn_prior.form = cfg.loss.bn_form
        gather = gather_with_grad if self.world_size > 1 else None
        self.objective: WeightedSum = generator_objective(cfg.loss, self.bn_prior, gather)
        if cfg.loss.agreement_target and self.control is None:
            self.control = AgreementControl(self.setting.device)
        self._weigh_ce()
        for group in self.optimizer.param_groups:
            group["betas"] = (cfg.generator.beta1, cfg.generator.beta2)

    def schedule(self, progress: float) -> None:
        lr = self.cfg.generator.lr * multistep(progress, self.cfg.generator.lr_milestones, self.cfg.generator.lr_gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.objective.scale(ADVERSARIAL_TERMS, ramp(progress, self.cfg.loss.adversarial_warmup))

    def begin_epoch(self, epoch: int) -> None:
        self.generator.train()
        self.noise.manual_seed(noise_seed(self.cfg.seed, self.rank, epoch))

    def draw(self) -> tuple[Tensor, Tensor]:
        """The next noise and pseudo-labels of this rank's stream (reseeded from seed, rank and epoch)."""
        device, batch = self.setting.device, self.setting.local_batch
        z = torch.randn(batch, self.cfg.generator.nz, device=device, generator=self.noise)
        y = torch.randint(0, self.setting.spec.num_classes, (batch,), device=device, generator=self.noise)
        return z, y

    def batch(self, z: Tensor, y: Tensor, generator: nn.Module, head: nn.Module | None) -> SynthBatch:
        """What the generator's objective looks at: ``G(z, y)`` through the teacher (its BN statistics
        captured when the prior is on) and the student, with graphs back to the generator."""
        setting = self.setting
        with record_function("generator_forward"):
            images = generator(z, y).contiguous(memory_format=setting.memory_format)
        capture = self.bn_prior.capture() if "bn" in self.objective.terms else contextlib.nullcontext()
        with capture, record_function("teacher_forward"):
            t_logits, t_features = setting.teacher_fwd(images, return_features=True)
        with record_function("student_forward"):
            s_logits, s_features = setting.student_fwd(images, return_features=True)
        if self.objective.needs_features and head is not None:
            s_features = head(s_features)
        return SynthBatch(y, t_logits, s_logits, t_features, s_features)

    def synthesize(self) -> dict[str, Tensor]:
        z, y = self.draw()
        with self.setting.autocast():
            batch = self.batch(z, y, self.generator_ddp, self.head_ddp)
            total, parts = self.objective(batch)
        if self.control is not None and self.cfg.loss.agreement_target:
            parts["ce_weight"] = self.steer(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            total.backward()
        if self.cfg.generator.reset_optimizer:
            self.optimizer.state.clear()  # Adam starts afresh: its first, bias-corrected step
        with record_function("optimizer"):
            self.optimizer.step()
        return {**parts, "total": total}

    def steer(self, batch: SynthBatch) -> Tensor:
        """``loss.agreement_target``: the CE weight for the next step from this step's agreement; returns this
        step's weight."""
        used = self.objective.weights["ce"]
        agreement = average(teacher_agrees(batch).float().mean())
        self.control.update(agreement, self.cfg.loss)
        self._weigh_ce()
        return torch.as_tensor(used, device=self.setting.device).detach()

    def _weigh_ce(self) -> None:
        if self.control is not None:
            self.objective.scale(("ce",), self.control.multiplier if self.cfg.loss.agreement_target else 1.0)

    def sample(self) -> tuple[Tensor, Tensor]:
        z, y = self.draw()
        return self.generator(z, y).contiguous(memory_format=self.setting.memory_format), y

    def diagnostics(self, epochs_done: int) -> dict[str, float]:
        return self.term_gradients(epochs_done) if self.cfg.eval.term_gradients else {}

    def term_gradients(self, epochs_done: int) -> dict[str, float]:
        """Each generator term's weighted gradient norm at the generator's weights, on one extra batch: which term
        drives the generator. The batch comes from its own stream, so training draws the same."""
        setting, objective = self.setting, self.objective
        rng = torch.Generator(device=setting.device).manual_seed(noise_seed(self.cfg.seed + 1, self.rank, epochs_done))
        z = torch.randn(setting.local_batch, self.cfg.generator.nz, device=setting.device, generator=rng)
        y = torch.randint(0, setting.spec.num_classes, (setting.local_batch,), device=setting.device, generator=rng)
        params = [p for p in self.generator.parameters() if p.requires_grad]
        # This forward must not move the BN running statistics: training continues as if it never ran.
        buffers = [b for model in (setting.student, self.generator) for b in model.buffers()]
        saved = [b.clone() for b in buffers]
        with setting.autocast():
            batch = self.batch(z, y, self.generator, self.head)
            values = {name: term(batch) for name, term in objective.terms.items()}
        norms = {}
        for name, value in values.items():
            grads = torch.autograd.grad(objective.weights[name] * value, params, retain_graph=True, allow_unused=True)
            norms[f"g_grad_{name}"] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads if g is not None])
            )
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
        names = sorted(norms)
        stacked = average(torch.stack([norms[n] for n in names]))
        return dict(zip(names, stacked.tolist()))

    def preview(self, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
        device = self.setting.device
        labels = torch.arange(self.setting.spec.num_classes, device=device).repeat_interleave(per_class)
        rng = torch.Generator(device=device).manual_seed(seed)
        z = torch.randn(len(labels), self.cfg.generator.nz, device=device, generator=rng)
        return self.generator(z, labels), labels

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "head": self.head.state_dict() if self.head is not None else {},
            "generator_opt": self.optimizer.state_dict(),
            **({"agreement_log_multiplier": self.control.log_multiplier} if self.control is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        if self.head is not None:
            self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["generator_opt"])
        if self.control is not None and "agreement_log_multiplier" in state:
            self.control.log_multiplier = state["agreement_log_multiplier"].to(self.setting.device)
            self._weigh_ce()


SYNTHESIZERS.add("conditional", GeneratorSynthesizer)


@SYNTHESIZERS.register("unconditional")
def unconditional_generator(cfg: Config, setting: Setting) -> GeneratorSynthesizer:
    """The same synthesis with a generator that ignores the labels (its images carry pseudo-labels all the same,
    for the terms that read them; set ``loss.eta=0`` so that none pulls an image towards a label it cannot show)."""
    return GeneratorSynthesizer(cfg, setting, conditional=False)


class OptimisedBatch:
    """One batch of images optimised directly, DeepInversion-style: each ``synthesize()`` is an Adam step on the
    pixels towards the teacher's cross-entropy on the target labels, the teacher's BN-statistics prior (when it has
    BN layers) and a small total-variation prior, with fixed weights. ``sample()`` gives the batch as it stands.
    The teacher alone judges it: the student and the run's loss config play no part."""

    PRIOR_WEIGHT = 0.1
    SMOOTHNESS_WEIGHT = 0.05

    def __init__(
        self, teacher: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, lr: float, prior: BNStatisticsPrior
    ):
        self.teacher, self.labels, self.prior = teacher, labels, prior
        self.images = images.clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.images], lr=lr)
        terms: dict[str, tuple[float, LossTerm]] = {"ce": (1.0, PseudoLabelCETerm("teacher"))}
        if prior is not None:
            terms["bn"] = (self.PRIOR_WEIGHT, prior)
        terms["tv"] = (self.SMOOTHNESS_WEIGHT, TotalVariationTerm())
        self.objective = WeightedSum(terms)

    def synthesize(self) -> dict[str, Tensor]:
        with self.prior.capture() if self.prior is not None else contextlib.nullcontext():
            logits = self.teacher(self.images)
        total, parts = self.objective(SynthBatch(self.labels, logits, images=self.images))
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return {**parts, "total": total}

    def sample(self) -> tuple[Tensor, Tensor]:
        return self.images.detach(), self.labels

    def begin_epoch(self, epoch: int) -> None:
        """Nothing is drawn per epoch: the same batch goes on being optimised."""

    def schedule(self, progress: float) -> None:
        """Its learning rate and weights are constant."""

    def apply_hyperparameters(self, cfg: Config) -> None:
        """Its weights are its own, not the run's loss config."""

    def diagnostics(self, epochs_done: int) -> dict[str, float]:
        return {}

    def preview(self, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
        chosen = torch.cat([(self.labels == c).nonzero()[:per_class, 0] for c in self.labels.unique()])
        return self.images.detach()[chosen], self.labels[chosen]

    def state_dict(self) -> dict[str, Any]:
        return {"batch": {"images": self.images.detach()}, "batch_opt": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["batch"]["images"])
        self.optimizer.load_state_dict(state["batch_opt"])


def _feature_dim(model: nn.Module, spec: ImageSpec, device: torch.device) -> int:
    probe = torch.zeros(2, spec.channels, spec.image_size, spec.image_size, device=device)
    with torch.no_grad():
        return model(probe, return_features=True)[1].shape[1]
