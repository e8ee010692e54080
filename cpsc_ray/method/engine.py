"""The CPSC-DFKD engine: pure PyTorch, steppable one epoch at a time, with its complete state in
``state_dict()``. It knows nothing of Ray; under ``torch.distributed`` it runs data-parallel.

Per iteration: ``g_steps`` synthesis steps (``Synthesizer.synthesize``: for CPSC-DFKD, generator steps), then
``s_steps`` student steps, each on a fresh batch from ``Synthesizer.sample``; the student's step does not know what
made its images. Work the method does not need is not done: the frozen teacher and, in synthesis steps, the student
compute no weight gradients; student steps synthesise under ``no_grad``; each optimizer is built once.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from cpsc_ray.config import Config, flatten
from cpsc_ray.errors import RunFailed
from cpsc_ray.method.device import (
    compiled,
    device_rng_state,
    graph_step_begins,
    keep_freed_host_memory,
    pick_device,
)
from cpsc_ray.method.losses import SynthBatch, WeightedSum, student_objective, teacher_agrees
from cpsc_ray.method.metric_names import LOSS_METRICS
from cpsc_ray.method.models import build_model
from cpsc_ray.method.parallel import average, world
from cpsc_ray.method.replay import with_replay
from cpsc_ray.method.schedules import warmup_cosine
from cpsc_ray.method.spec import EvalSet, ImageSpec
from cpsc_ray.method.synthesis import SYNTHESIZERS, Setting, SynthesizerBuilder

# Config keys that shape the models or decide the optimizers: an engine cannot take a new value mid-run.
MODEL_SHAPING_KEYS = (
    "student.arch",
    "student.kwargs",
    "student.replay_images",
    "generator.arch",
    "generator.kind",
    "generator.nz",
    "generator.ngf",
    "loss.train_projection_head",
)


class DivergenceError(RunFailed):
    """A loss became NaN or infinite; the run cannot usefully continue."""


DIVERGENCE_FIX = "lower student.lr, generator.lr or the loss weights"


class DistillEngine:
    def __init__(
        self,
        cfg: Config,
        teacher: nn.Module,
        spec: ImageSpec,
        eval_sets: dict[str, EvalSet] | None = None,
        device: torch.device | None = None,
        synthesizer: SynthesizerBuilder | None = None,
    ):
        """``synthesizer`` builds what makes the student's images; by default the one ``generator.kind`` names."""
        self.cfg = cfg
        self.spec = spec
        self.device = device or pick_device(cfg.train.device)
        self.rank, self.world_size = world()
        if cfg.train.batch_size % self.world_size:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} must be divisible by the {self.world_size} workers"
            )
        self.local_batch = cfg.train.batch_size // self.world_size
        self.amp = cfg.train.amp
        if self.device.type == "cpu":
            keep_freed_host_memory()
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self._build_student(teacher)
        # Built after the student and before its optimizer: the seeded draws that initialise the models are made in
        # the order of every earlier version (student, generator, projection head).
        build = synthesizer or SYNTHESIZERS.get(cfg.generator.kind, "generator.kind")
        setting = self._setting()
        self.synthesizer = with_replay(build(cfg, setting), cfg, setting)
        self._build_student_optimizer()
        self.eval_sets = {
            name: EvalSet(s.images.to(self.device, memory_format=self.memory_format), s.labels.to(self.device))
            for name, s in (eval_sets or {}).items()
        }
        self.epoch = 0
        self.images_synthesized = 0  # over the state's whole history, inherited ones included after a clone
        self.device_seconds = 0.0
        self.last_epoch_cost: dict[str, float] = {}
        self.apply_hyperparameters(cfg)

    # ----- construction ----------------------------------------------------------------------
    def _build_student(self, teacher: nn.Module) -> None:
        cfg, spec = self.cfg, self.spec
        self.teacher = teacher.to(self.device, memory_format=self.memory_format).eval().requires_grad_(False)
        self.student = build_model(cfg.student.arch, spec.num_classes, spec.channels, **cfg.student.kwargs)
        self.student.to(self.device, memory_format=self.memory_format)
        self.teacher_fwd = compiled(self.teacher, cfg.train)
        self.student_fwd = compiled(self.student, cfg.train)

    def _setting(self) -> Setting:
        return Setting(
            self.teacher,
            self.teacher_fwd,
            self.student,
            self.student_fwd,
            self.spec,
            self.local_batch,
            self.device,
            self.memory_format,
            self.autocast,
        )

    def _build_student_optimizer(self) -> None:
        """The student's SGD and, under torch.distributed, its DDP wrapper (compiled on request)."""
        cfg, on_cuda = self.cfg, self.device.type == "cuda"
        fused = {"fused": True} if on_cuda else {}
        self.student_opt = torch.optim.SGD(
            self.student.parameters(),
            lr=cfg.student.lr,
            momentum=cfg.student.momentum,
            weight_decay=cfg.student.weight_decay,
            **fused,
        )
        self.student_ddp: nn.Module = self.student
        if self.world_size > 1:
            self.student_ddp = DistributedDataParallel(
                self.student, device_ids=[self.device.index] if on_cuda else None
            )
        self.student_ddp = compiled(self.student_ddp, cfg.train)

    # ----- hyperparameters -------------------------------------------------------------------
    def apply_hyperparameters(self, cfg: Config) -> None:
        """Put a (possibly perturbed) config in effect: loss weights and temperatures, base learning
        rates, step counts. Called after ``load_state_dict`` so restored optimizer state cannot win."""
        before, after = flatten(self.cfg), flatten(cfg)
        for key in MODEL_SHAPING_KEYS:
            if after[key] != before[key]:
                raise ValueError(f"{key} cannot change during a run (it shapes the models or their optimizers)")
        self.cfg = cfg
        self.synthesizer.apply_hyperparameters(cfg)
        self.student_loss: WeightedSum = student_objective(cfg.loss)
        for group in self.student_opt.param_groups:
            group["momentum"], group["weight_decay"] = cfg.student.momentum, cfg.student.weight_decay
        self._apply_schedules(self._progress(0))

    def _progress(self, iteration: int) -> float:
        per_epoch = self.cfg.train.iterations_per_epoch
        return (self.epoch * per_epoch + iteration) / (self.cfg.train.epochs * per_epoch)

    def _apply_schedules(self, progress: float) -> None:
        """Learning rates (and the synthesizer's loss scales) at this point of the run."""
        student_lr = self.cfg.student.lr * warmup_cosine(progress, self.cfg.student.warmup_fraction)
        for group in self.student_opt.param_groups:
            group["lr"] = student_lr
        self.synthesizer.schedule(progress)

    # ----- training --------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def _synthesis_step(self, sums: dict[str, Tensor]) -> Tensor:
        with record_function("synthesis_step"):
            parts = self.synthesizer.synthesize()
        self._accumulate(sums, {f"g_{name}": value for name, value in parts.items()})
        return parts["total"]

    def _student_step(self, sums: dict[str, Tensor]) -> Tensor:
        with record_function("student_step"):
            with torch.no_grad(), self.autocast():
                with record_function("sample"):
                    images, y = self.synthesizer.sample()
                with record_function("teacher_forward"):
                    t_logits = self.teacher_fwd(images)
            with self.autocast():
                with record_function("student_forward"):
                    s_logits = self.student_ddp(images)
                batch = SynthBatch(y, t_logits, s_logits)
                total, parts = self.student_loss(batch)
            self.student_opt.zero_grad(set_to_none=True)
            with record_function("backward"):
                total.backward()
            with record_function("optimizer"):
                self.student_opt.step()
        teacher_logits, student_logits = t_logits.float(), s_logits.detach().float()
        self._accumulate(
            sums,
            {
                **{f"s_{name}": value for name, value in {**parts, "total": total}.items()},
                "teacher_pseudo_acc": teacher_agrees(batch).float().mean(),
                "teacher_logit_rms": teacher_logits.pow(2).mean().sqrt(),
                "student_logit_rms": student_logits.pow(2).mean().sqrt(),
            },
        )
        return total

    @staticmethod
    def _accumulate(sums: dict[str, list[Tensor]], values: dict[str, Tensor]) -> None:
        for key, value in values.items():
            sums.setdefault(key, []).append(value.detach().float())

    def train_epoch(self) -> dict[str, float]:
        """Run one epoch; returns the mean of every loss term by name, learning rates, throughput."""
        cfg = self.cfg.train
        self.teacher.eval()
        self.student.train()
        self.synthesizer.begin_epoch(self.epoch)
        sums: dict[str, list[Tensor]] = {}
        finite = torch.ones((), device=self.device)
        started = time.perf_counter()
        for iteration in range(cfg.iterations_per_epoch):
            self._apply_schedules(self._progress(iteration))
            self.student.requires_grad_(False)
            for _ in range(cfg.g_steps):
                graph_step_begins(cfg)
                finite = finite * torch.isfinite(self._synthesis_step(sums))
            self.student.requires_grad_(True)
            for _ in range(cfg.s_steps):
                graph_step_begins(cfg)
                finite = finite * torch.isfinite(self._student_step(sums))
        names = sorted(sums)
        values = torch.stack([torch.stack(sums[n]).mean() for n in names] + [finite])
        average(values)
        if self.world_size > 1:
            self._sync_student_buffers()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        *means, all_finite = values.tolist()
        self.epoch += 1
        # A diverged epoch still spent its compute: count it before giving up, so totals stay honest.
        images = cfg.iterations_per_epoch * (cfg.g_steps + cfg.s_steps) * cfg.batch_size
        self.images_synthesized += images
        self.device_seconds += seconds * self.world_size
        self.last_epoch_cost = {"epoch_images": images, "epoch_s": seconds}
        if all_finite < 1:
            raise DivergenceError(f"a loss became NaN or infinite in epoch {self.epoch}")
        metrics = {name: None for name in LOSS_METRICS}
        metrics.update(dict(zip(names, means)))
        metrics.update(self.synthesizer.diagnostics(self.epoch))
        metrics.update(
            epoch=self.epoch,
            lr_student=self.student_opt.param_groups[0]["lr"],
            lr_generator=self.synthesizer.optimizer.param_groups[0]["lr"],
            images=self.images_synthesized,
            epoch_images=images,
            images_per_s=images / seconds,
            epoch_s=seconds,
            device_s=self.device_seconds,
        )
        return metrics

    def _sync_student_buffers(self) -> None:
        # Generator steps update each rank's BN running statistics with its own batches.
        for buffer in self.student.buffers():
            dist.broadcast(buffer, src=0)

    # ----- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Student top-1 on each evaluation set, sharded across ranks and summed; and ``<set>_coverage``,
        the fraction of classes the student predicts there (a collapsed student predicts one or a few)."""
        self.student.eval()
        results = {}
        classes = self.spec.num_classes
        for name, eval_set in self.eval_sets.items():
            images, labels = (
                eval_set.images[self.rank :: self.world_size],
                eval_set.labels[self.rank :: self.world_size],
            )
            correct = torch.zeros(1, device=self.device)
            predicted = torch.zeros(classes, device=self.device)
            for start in range(0, len(labels), self.cfg.eval.batch_size):
                with self.autocast():
                    logits = self.student_fwd(images[start : start + self.cfg.eval.batch_size])
                predictions = logits.argmax(1)
                correct += (predictions == labels[start : start + self.cfg.eval.batch_size]).sum()
                predicted += torch.bincount(predictions, minlength=classes)[:classes]
            counts = torch.cat([correct, predicted])
            if self.world_size > 1:
                dist.all_reduce(counts)
            results[name] = (counts[0] / counts[1:].sum().clamp(min=1)).item()
            results[f"{name}_coverage"] = (counts[1:] > 0).float().mean().item()
        self.student.train()
        return results

    @torch.no_grad()
    def preview(self, per_class: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """``per_class`` synthetic images of every class (class-major), in [0, 1] for viewing."""
        images, labels = self.synthesizer.preview(per_class, seed)
        images = images.float()
        mean = torch.tensor(self.spec.mean, device=self.device)[:, None, None]
        std = torch.tensor(self.spec.std, device=self.device)[:, None, None]
        return (images * std + mean).clamp(0, 1).cpu(), labels.cpu()

    # ----- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically; the frozen teacher is not included."""
        return {
            "student": self.student.state_dict(),
            **self.synthesizer.state_dict(),  # for CPSC-DFKD's: generator, head, generator_opt
            "student_opt": self.student_opt.state_dict(),
            "schedule": {"epoch": self.epoch},
            "counters": {"images_synthesized": self.images_synthesized, "device_seconds": self.device_seconds},
            # This engine's device only: a restart may see a different set of GPUs (issue #11).
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.synthesizer.load_state_dict(state)
        self.student_opt.load_state_dict(state["student_opt"])
        self.epoch = int(state["schedule"]["epoch"])
        self.images_synthesized = int(state["counters"]["images_synthesized"])
        self.device_seconds = float(state["counters"]["device_seconds"])
        torch.set_rng_state(state["rng"]["torch"].cpu())  # RNG states are host tensors, however the dict was mapped
        cuda_state = device_rng_state(state["rng"]["cuda"], self.device)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, self.device)
        # Restored optimizer state carries the source's learning rates and betas: the config wins.
        self.apply_hyperparameters(self.cfg)
