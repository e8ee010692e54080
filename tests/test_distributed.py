"""Ray Train: DDP across 2 CPU workers (gloo), checkpoints, recovery from a killed worker."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from conftest import TINY, tensorboard_scalars

from cpsc_ray.cli import main
from cpsc_ray.cluster.recovery import COLLECTIVE_TIMEOUT_S
from cpsc_ray.config import Config, with_values
from cpsc_ray.layout import RunDir
from cpsc_ray.runs.checkpoints import read_checkpoint
from cpsc_ray.runs.tensorboard import scalars_of
from cpsc_ray.storage import Storage


def ddp_probe_loop(config: dict) -> None:
    """Runs inside each Ray Train worker: one epoch, then compares what the ranks hold."""
    import ray.train

    from cpsc_ray.method.losses import BNStatisticsPrior, ContrastiveTerm, SynthBatch, supervised_contrastive
    from cpsc_ray.runs.assembly import prepare_engine

    cfg = Config.model_validate(config["cfg"])
    engine = prepare_engine(cfg, torch.device("cpu")).engine
    engine.train_epoch()
    rank = dist.get_rank()

    def gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return out

    params = torch.cat([p.detach().flatten() for p in engine.student.parameters()])
    generator_params = torch.cat([p.detach().flatten() for p in engine.synthesizer.generator.parameters()])
    engine.synthesizer.begin_epoch(engine.epoch)
    z, y = engine.synthesizer.draw()
    with torch.no_grad():
        images = engine.synthesizer.generator(z, y)
    all_params, all_generator, all_images = gathered(params), gathered(generator_params), gathered(images)
    # The CE weight's multiplier follows the global batch's agreement, so every rank weighs the CE alike.
    multipliers = gathered(engine.synthesizer.control.log_multiplier)

    # The BN prior and SupCon see the global batch: equal to one process computing them on all of it.
    with engine.synthesizer.bn_prior.capture():
        engine.teacher(images)
    distributed_bn = engine.synthesizer.bn_prior().item()
    features = torch.nn.functional.normalize(
        torch.randn(len(y), 2, 8, generator=torch.Generator().manual_seed(rank)), dim=2
    )
    distributed_scl = engine.synthesizer.objective.terms["scl"].gather
    scl = supervised_contrastive(distributed_scl(features), distributed_scl(y), 0.5, 0.5).item()
    local_prior = BNStatisticsPrior(engine.teacher, form=engine.synthesizer.bn_prior.form)
    with local_prior.capture():
        engine.teacher(torch.cat(all_images))
    single_bn = local_prior().item()
    single_scl = supervised_contrastive(torch.cat(gathered(features)), torch.cat(gathered(y)), 0.5, 0.5).item()
    # Over instances, no image shares a class with another image of any rank.
    views = torch.randn(2, len(y), 8, generator=torch.Generator().manual_seed(10 + rank))
    logits = torch.zeros(len(y), 10)  # unread over instances
    local = SynthBatch(y, logits, teacher_features=views[0], student_features=views[1])
    instances_distributed = ContrastiveTerm(0.5, 0.5, distributed_scl, instances=True)(local).item()
    everyone = SynthBatch(
        torch.cat(gathered(y)),
        torch.cat(gathered(logits)),
        teacher_features=torch.cat(gathered(views[0])),
        student_features=torch.cat(gathered(views[1])),
    )
    instances_single = ContrastiveTerm(0.5, 0.5, instances=True)(everyone).item()
    # Train V2 keeps the metrics of the latest checkpoint as the run's result, so rank 0 attaches one.
    directory = tempfile.mkdtemp()
    Path(directory, "probe.txt").write_text("ddp probe")
    checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
    ray.train.report(
        checkpoint=checkpoint,
        metrics={
            "rank0_params_equal_rank1": bool(torch.equal(all_params[0], all_params[1])),
            "generators_equal": bool(torch.equal(all_generator[0], all_generator[1])),
            "batches_differ": bool(not torch.equal(all_images[0], all_images[1])),
            "ce_multipliers": [m.item() for m in multipliers],
            "bn_distributed": distributed_bn,
            "bn_single": single_bn,
            "scl_distributed": scl,
            "scl_single": single_scl,
            "instances_distributed": instances_distributed,
            "instances_single": instances_single,
            "world_size": dist.get_world_size(),
            "local_batch": engine.local_batch,
        },
    )


def test_ddp_keeps_ranks_in_step_and_draws_different_batches(ray_local, digits_cfg, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        ddp_probe_loop,
        train_loop_config={
            "cfg": with_values(
                digits_cfg, {"loss.train_projection_head": True, "loss.agreement_target": 0.75}
            ).model_dump()
        },
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="ddp-probe", storage_path=str(tmp_path)),
    )
    metrics = trainer.fit().metrics
    assert metrics["world_size"] == 2 and metrics["local_batch"] == digits_cfg.train.batch_size // 2
    assert metrics["rank0_params_equal_rank1"] and metrics["generators_equal"]
    assert metrics["batches_differ"]
    first, second = metrics["ce_multipliers"]
    assert first == second != 0
    assert metrics["bn_distributed"] == pytest.approx(metrics["bn_single"], rel=1e-4)
    assert metrics["scl_distributed"] == pytest.approx(metrics["scl_single"], rel=1e-5)
    assert metrics["instances_distributed"] == pytest.approx(metrics["instances_single"], rel=1e-5)


def distill_workers(tmp_path: Path, *extra: str) -> int:
    return main(["distill", "--name", "dist", "--workers", "2", "--storage", str(tmp_path / "runs"), *TINY, *extra])


def test_a_hung_worker_is_replaced_and_the_run_resumes(ray_local, digits_cfg, tmp_path, capsys):
    """Rank 1 stops answering at the start of epoch 4; rank 0's next collective times out after 10 s (not torch's
    30 minutes), Ray Train restarts the group and the run resumes from epoch 2's checkpoint."""
    started = time.monotonic()
    code = distill_workers(
        tmp_path,
        *("train.epochs=4", "train.checkpoint_every=2", "--max-restarts", "1", "--collective-timeout", "10"),
        *("--inject-fault-at-epoch", "4", "--inject-fault", "hang"),
    )
    assert code == 0, capsys.readouterr().err
    assert time.monotonic() - started < COLLECTIVE_TIMEOUT_S, "the run waited out the default collective timeout"
    run = tmp_path / "runs/dist"
    assert "hung at the start of epoch 4" in (run / ".fault-injected").read_text()
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert all(r["workers"] == 2 for r in rows)
    assert rows[-1]["images"] == 4 * 2 * (2 + 2) * 32  # restored counters, not restarted ones
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["last"]["test_acc"] == rows[-1]["test_acc"]

    # Rank 0 alone wrote TensorBoard files, one per start of the run; epoch 3, lost with the hung
    # worker and trained again, shows once: the rerun's value.
    assert len(list((run / RunDir.TENSORBOARD).glob("events.out.tfevents.*"))) == 2
    scalars = tensorboard_scalars(run / RunDir.TENSORBOARD)
    for row in rows:
        for name, value in scalars_of(row).items():
            assert scalars[name][row["epoch"]] == pytest.approx(value, rel=1e-6), (name, row["epoch"])
    assert set(scalars["s_total"]) == {1, 2, 3, 4}


def test_without_retries_the_run_fails_clearly_and_keeps_its_checkpoints(ray_local, digits_cfg, tmp_path, capsys):
    code = distill_workers(tmp_path, "train.epochs=3", "--max-failures", "0", "--inject-fault-at-epoch", "3")
    assert code == 1
    err = capsys.readouterr().err
    assert "run dist failed" in err and "--resume dist" in err
    run = Storage(str(tmp_path / "runs/dist"))
    checkpoints = [d for d in run.list_dirs() if d.startswith("checkpoint_")]
    assert checkpoints
    epochs = sorted(read_checkpoint(run.child(d))[1]["epoch"] for d in checkpoints)
    assert epochs[-1] == 2
    rows = pq.read_table(tmp_path / "runs/dist/metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2]
