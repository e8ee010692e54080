"""The student's memory of past synthetic images: which images a student batch holds, the ring's order, and a
restored memory that continues as the saved one would."""

from __future__ import annotations

import contextlib

import torch

from cpsc_ray.config import Config, with_values
from cpsc_ray.method.replay import ReplayMemory, with_replay
from cpsc_ray.method.spec import ImageSpec
from cpsc_ray.method.synthesis import Setting

SPEC = ImageSpec(num_classes=10, channels=1, image_size=2, mean=(0.0,), std=(1.0,))


class Counting:
    """A synthesizer whose k-th image (counting from 0 over the run) is filled with k and labelled k."""

    def __init__(self, batch: int):
        self.batch, self.made = batch, 0

    def sample(self):
        numbers = torch.arange(self.made, self.made + self.batch)
        self.made += self.batch
        return numbers.float()[:, None, None, None].expand(-1, 1, 2, 2).clone(), numbers

    def begin_epoch(self, epoch):
        pass

    def state_dict(self):
        return {"made": self.made}

    def load_state_dict(self, state):
        self.made = state["made"]


def memory(capacity: int, fraction: float, batch: int = 4) -> ReplayMemory:
    cfg = with_values(Config(), {"student.replay_images": capacity, "student.replay_fraction": fraction})
    setting = Setting(None, None, None, None, SPEC, batch, torch.device("cpu"), torch.contiguous_format,
                      contextlib.nullcontext)  # fmt: skip
    replay = with_replay(Counting(batch), cfg, setting)
    replay.begin_epoch(0)
    return replay


def test_a_student_batch_is_fresh_images_then_remembered_ones():
    replay = memory(capacity=6, fraction=0.5)
    images, labels = replay.sample()
    assert labels.tolist() == [0, 1, 2, 3]  # nothing remembered yet: all fresh
    assert replay.labels[: replay.filled].tolist() == [0, 1, 2, 3]
    images, labels = replay.sample()  # fresh 4..7: the first two kept, two drawn from the memory (0..3)
    assert labels[:2].tolist() == [4, 5] and all(0 <= y <= 3 for y in labels[2:].tolist())
    assert torch.equal(images[:, 0, 0, 0], labels.float())  # each image travels with its own label
    # The ring holds the last 6 fresh images, the oldest overwritten first: 6, 7 where 0, 1 were.
    assert replay.labels.tolist() == [6, 7, 2, 3, 4, 5] and replay.filled == 6 and replay.cursor == 2


def test_replay_off_is_the_synthesizer_itself_and_fraction_one_replays_the_whole_batch():
    off = memory(capacity=0, fraction=0.5)
    assert isinstance(off, Counting)
    whole = memory(capacity=8, fraction=1.0)
    whole.sample()
    _, labels = whole.sample()
    assert all(0 <= y <= 3 for y in labels.tolist())


def test_a_restored_memory_draws_what_the_saved_one_would():
    saved = memory(capacity=6, fraction=0.5)
    for _ in range(3):
        saved.sample()
    state = saved.state_dict()
    restored = memory(capacity=6, fraction=0.5)
    restored.load_state_dict(state)
    for replay in (saved, restored):
        replay.begin_epoch(1)
    for _ in range(3):
        a, b = saved.sample(), restored.sample()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    empty = memory(capacity=6, fraction=0.5)
    empty.load_state_dict({"made": 0})  # a state saved without a memory: it starts empty
    assert empty.filled == 0 and empty.sample()[1].tolist() == [0, 1, 2, 3]
