"""benchmarks/scaling_model.py's inputs, checked where this machine can: what two gloo workers send in
one epoch, every collective counted as it is sent, is what the model's ``traffic`` says for the same
config; and its collective costs follow the ring model it states."""

from __future__ import annotations

import gc
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpsc_ray.config import load_config, with_values
from cpsc_ray.method.engine import DistillEngine
from cpsc_ray.method.models import build_model
from cpsc_ray.method.spec import ImageSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from scaling_inputs import traffic  # noqa: E402
from scaling_model import NETWORK_EFFICIENCY, NVLINK_EFFICIENCY, NVLINK_GB_S, Fabric, collective_seconds  # noqa: E402

WORLD = 2
SPEC = ImageSpec(10, 1, 16, (0.5,), (0.5,))
# Every step kind and every collective: the digits student is narrower than its teacher, so a trained
# projection head adds a third DDP module. Its tiny models cost little next to the two workers' imports.
SMALL = {
    "train.batch_size": 16,
    "train.iterations_per_epoch": 2,
    "train.g_steps": 2,
    "train.s_steps": 3,
    "loss.train_projection_head": True,
}


def small_engine() -> DistillEngine:
    cfg = with_values(load_config("digits"), SMALL)
    return DistillEngine(cfg, build_model("digits_teacher", 10, 1), SPEC, device=torch.device("cpu"))


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def count_one_epoch(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: wrap the torch.distributed calls the engine, its losses and DDP make, hook DDP's
    gradient buckets, run one epoch and write down every call with its bytes."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    engine = small_engine()
    sent: list[tuple[str, int]] = []
    all_reduce = dist.all_reduce

    def count(name: str, collective: str, size) -> None:
        original = getattr(dist, name)

        def counted(*args, **kwargs):
            sent.append((collective, size(*args)))
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    count("all_reduce", "all_reduce", lambda tensor, *_, **__: nbytes(tensor))
    count("all_gather", "all_gather", lambda out, *_, **__: sum(map(nbytes, out)))
    count("reduce_scatter", "reduce_scatter", lambda out, inputs, *_, **__: sum(map(nbytes, inputs)))
    count("scatter", "scatter", lambda out, *_, **__: nbytes(out))  # gloo's stand-in for reduce_scatter
    count("broadcast", "broadcast", lambda tensor, *_, **__: nbytes(tensor))
    count("_broadcast_coalesced", "broadcast", lambda group, tensors, *_: sum(map(nbytes, tensors)))

    def gradient_bucket(state, bucket):  # DDP's default all-reduce hook, counted
        sent.append(("all_reduce", nbytes(bucket.buffer())))
        averaged = bucket.buffer().div_(WORLD)
        return all_reduce(averaged, async_op=True).get_future().then(lambda done: done.value()[0])

    for module in (engine.student_ddp, engine.synthesizer.generator_ddp, engine.synthesizer.head_ddp):
        module.register_comm_hook(None, gradient_bucket)
    engine.train_epoch()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(sent))
    # Both ranks done before either tears down, and the DDP wrappers (whose gloo work holds tensors)
    # freed while the interpreter is whole: a rank that exits first, or a reducer freed at interpreter
    # shutdown, aborts the other rank (SIGABRT, "terminate called without an active exception").
    dist.barrier()
    del engine
    gc.collect()
    dist.destroy_process_group()


def as_sent(calls: list[list]) -> list[tuple[str, int]]:
    """gloo's reduce-scatter (all_gather's backward) is one scatter from each rank: WORLD in a row."""
    calls = [tuple(call) for call in calls]
    scatters = [size for collective, size in calls if collective == "scatter"]
    merged = [("reduce_scatter", sum(scatters[i : i + WORLD])) for i in range(0, len(scatters), WORLD)]
    return [call for call in calls if call[0] != "scatter"] + merged


def test_the_bytes_two_gloo_workers_send_are_the_models(tmp_path):
    mp.spawn(count_one_epoch, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    engine = small_engine()
    train = engine.cfg.train
    times = {
        "generator": train.g_steps * train.iterations_per_epoch,
        "student": train.s_steps * train.iterations_per_epoch,
        "epoch": 1,
    }
    messages = traffic(engine, WORLD, train.batch_size // WORLD)
    predicted = Counter((m.collective, m.nbytes) for m in messages for _ in range(times[m.step]))
    assert {m.what for m in messages} >= {"head gradients", "SupCon features and labels", "BN statistics"}
    for rank in range(WORLD):
        assert Counter(as_sent(json.loads((tmp_path / f"{rank}.json").read_text()))) == predicted


def test_collective_costs_follow_the_ring_model():
    fabric, gigabyte = Fabric(network_gbps=100), 1e9
    nvlink, network = NVLINK_GB_S[4] * 1e9 * NVLINK_EFFICIENCY, 100 / 8 * 1e9 * NETWORK_EFFICIENCY
    assert collective_seconds("all_reduce", gigabyte, 1, fabric) == 0
    # Large messages: NCCL's Simple protocol (8.4 us, then 3.4 us per NVLink hop, 14 us per network
    # crossing); 2(n-1)/n S over NVLink inside a node, through each node's network links across nodes.
    assert collective_seconds("all_reduce", gigabyte, 8, fabric) == pytest.approx(
        2 * 7 / 8 * gigabyte / nvlink + (8.4 + 14 * 3.4) * 1e-6
    )
    assert collective_seconds("all_reduce", gigabyte, 16, fabric) == pytest.approx(
        2 * 15 / 16 * gigabyte / network + (8.4 + 26 * 3.4 + 4 * 14) * 1e-6
    )
    assert collective_seconds("all_gather", gigabyte, 16, fabric) == pytest.approx(
        15 / 16 * gigabyte / network + (8.4 + 14 * 3.4 + 14) * 1e-6
    )
    # Small messages: latency-bound, NCCL's LL protocol: 6.6 us, 0.6 us per NVLink hop, 2.7 per crossing.
    assert collective_seconds("all_reduce", 64, 8, fabric) == pytest.approx((6.6 + 14 * 0.6) * 1e-6, rel=1e-2)
    assert collective_seconds("all_reduce", 64, 64, fabric) == pytest.approx(
        (6.6 + 110 * 0.6 + 16 * 2.7) * 1e-6, rel=1e-2
    )
