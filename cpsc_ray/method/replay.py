"""A memory of past synthetic images the student keeps learning from (CMI's and Fast-Datafree's data pool), around
any synthesizer: each student batch is the synthesizer's fresh images with ``student.replay_fraction`` of them
replaced by images drawn from the memory, and every fresh image enters the memory, a ring of
``student.replay_images`` images per worker (the oldest leave first). The generator keeps moving; the memory keeps
what it made before in the student's view. The synthesis steps do not see the memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cpsc_ray.config import Config
from cpsc_ray.method.parallel import noise_seed, world
from cpsc_ray.method.synthesis import Setting, Synthesizer

# Draws from the memory use their own stream (seed + REPLAY_STREAM), so the synthesizer's stays what it was.
REPLAY_STREAM = 2


class ReplayMemory:
    def __init__(self, inner: Synthesizer, cfg: Config, setting: Setting):
        self.inner, self.setting = inner, setting
        self.rank, _ = world()
        self.capacity = cfg.student.replay_images
        self.cfg = cfg
        spec = setting.spec
        shape = (self.capacity, spec.channels, spec.image_size, spec.image_size)
        self.images = torch.empty(shape, device=setting.device).contiguous(memory_format=setting.memory_format)
        self.labels = torch.empty(self.capacity, dtype=torch.long, device=setting.device)
        self.filled = 0  # images held
        self.cursor = 0  # where the next fresh image is written
        self.draws = torch.Generator(device=setting.device)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.inner.optimizer

    @property
    def objective(self):
        return self.inner.objective

    def synthesize(self) -> dict[str, Tensor]:
        return self.inner.synthesize()

    def sample(self) -> tuple[Tensor, Tensor]:
        images, labels = self.inner.sample()
        replayed = min(round(self.cfg.student.replay_fraction * len(labels)), self.filled)
        batch_images, batch_labels = images, labels
        if replayed:
            picks = torch.randint(0, self.filled, (replayed,), device=self.setting.device, generator=self.draws)
            keep = len(labels) - replayed
            batch_images = torch.cat([images[:keep], self.images[picks].to(images.dtype)]).contiguous(
                memory_format=self.setting.memory_format
            )
            batch_labels = torch.cat([labels[:keep], self.labels[picks]])
        self._remember(images, labels)
        return batch_images, batch_labels

    def _remember(self, images: Tensor, labels: Tensor) -> None:
        """Write the fresh batch into the ring (a batch larger than the memory keeps its last images)."""
        images, labels = images[-self.capacity :], labels[-self.capacity :]
        positions = (self.cursor + torch.arange(len(labels), device=labels.device)) % self.capacity
        self.images[positions] = images.float()
        self.labels[positions] = labels
        self.cursor = (self.cursor + len(labels)) % self.capacity
        self.filled = min(self.filled + len(labels), self.capacity)

    def begin_epoch(self, epoch: int) -> None:
        self.inner.begin_epoch(epoch)
        self.draws.manual_seed(noise_seed(self.cfg.seed + REPLAY_STREAM, self.rank, epoch))

    def schedule(self, progress: float) -> None:
        self.inner.schedule(progress)

    def apply_hyperparameters(self, cfg: Config) -> None:
        self.cfg = cfg  # replay_fraction may change mid-run; the memory's size may not (MODEL_SHAPING_KEYS)
        self.inner.apply_hyperparameters(cfg)

    def diagnostics(self, epochs_done: int) -> dict[str, float]:
        return self.inner.diagnostics(epochs_done)

    def preview(self, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
        return self.inner.preview(per_class, seed)

    def state_dict(self) -> dict[str, Any]:
        """This worker's memory: each worker holds its own, so a multi-worker checkpoint that keeps one worker's
        state restores every worker's memory from it (the images are the same kind; which ones differ)."""
        return {
            **self.inner.state_dict(),
            "replay": {
                "images": self.images[: self.filled].clone(),
                "labels": self.labels[: self.filled].clone(),
                "cursor": self.cursor,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
        memory = state.get("replay")  # absent: the state was saved without a memory (a PBT source without one)
        if memory is None:
            self.filled = self.cursor = 0
            return
        self.filled = min(len(memory["labels"]), self.capacity)
        self.images[: self.filled] = memory["images"][: self.filled].to(self.images.device)
        self.labels[: self.filled] = memory["labels"][: self.filled].to(self.labels.device)
        self.cursor = int(memory["cursor"]) % self.capacity


def with_replay(synthesizer: Synthesizer, cfg: Config, setting: Setting) -> Synthesizer:
    """The synthesizer the student learns from: with a memory when ``student.replay_images`` is set."""
    return ReplayMemory(synthesizer, cfg, setting) if cfg.student.replay_images else synthesizer
