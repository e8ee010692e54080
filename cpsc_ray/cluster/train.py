"""Ray Train around the engine: one distillation run over many workers (DDP; NCCL on GPU, gloo on
CPU), checkpoints every ``train.checkpoint_every`` epochs, restarts after worker failures.

The driver resolves the teacher and its probe set once, then starts a ``TorchTrainer``. Every worker
builds the same engine, which wraps student, generator and a trained projection head in DDP;
rank 0 writes the run's outputs (metrics, best student, samples) under the run's storage, which is
also where Ray Train keeps the checkpoints: ``<storage>/<run name>/``.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cpsc_ray.cluster.metrics import ray_metrics, tune_metrics
from cpsc_ray.cluster.reach import check_every_node_reads
from cpsc_ray.cluster.recovery import Fault, Recovery
from cpsc_ray.cluster.resources import Request, announcing_waits, check_fits
from cpsc_ray.config import Config
from cpsc_ray.errors import InputError, RunFailed
from cpsc_ray.layout import RootDir, RunDir
from cpsc_ray.method.device import pick_device
from cpsc_ray.method.engine import DIVERGENCE_FIX, DivergenceError
from cpsc_ray.results.lineage import Exploit
from cpsc_ray.results.tables import publish
from cpsc_ray.runs.assembly import RunRole, check_model_names, open_run, run_distillation, with_absolute_paths
from cpsc_ray.runs.checkpoints import newest_checkpoint, read_checkpoint, resume_point, write_checkpoint_dir
from cpsc_ray.runs.loop import EpochHooks, StartState
from cpsc_ray.runs.probe import load_or_make_probe
from cpsc_ray.runs.run import DistillRun
from cpsc_ray.runs.teacher import ensure_teacher, load_teacher
from cpsc_ray.storage import Storage

HANG_S = 24 * 3600
# Ray Train reads it in its controller, which it starts with this process's environment.
START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class DistributedRunError(RunFailed):
    """A distributed run that failed for good; the message says what is kept and how to resume."""


def inject_fault_once(outputs: RunDir, epoch: int, fault: Fault | None, rank: int) -> None:
    """Inject ``fault`` the first time any run reaches its epoch, on rank 1 (rank 0 when alone). The marker in
    the run's storage makes it fire once across restarts."""
    if fault is None or epoch != fault.epoch or rank != min(1, ray.train.get_context().get_world_size() - 1):
        return
    if outputs.exists(RunDir.FAULT_MARKER):
        return
    what = "hung" if fault.kind == "hang" else "killed"
    outputs.write_text(RunDir.FAULT_MARKER, f"worker {rank} {what} at the start of epoch {epoch}\n")
    if fault.kind == "hang":
        time.sleep(HANG_S)  # until the restart that the peers' collective timeout causes ends this process
    os._exit(1)


@dataclass(frozen=True)
class WorkerLoop:
    """What every worker of a Ray Train run needs: the config, where outputs go, the run's role, and for a
    round of a multi-worker tuning trial the state to start from, the epoch to stop at, the checkpoint
    interval and whether the round ends the run."""

    config: dict[str, Any]
    outputs: str
    role: RunRole
    fault: Fault | None = None
    start_state: str | None = None
    exploit: Exploit | None = None
    stop_epoch: int | None = None
    checkpoint_every: int | None = None
    keep_best: bool = True
    launched_at: float | None = None  # time.time() when the driver started the Train run: set-up is charged from it


class TrainHooks(EpochHooks):
    """Reports every epoch to Ray Train; rank 0 attaches the checkpoint when one is due. A tuning trial's
    run reports what Tune needs: ``TuneReportCallback`` forwards rank 0's metrics to the trial."""

    def __init__(self, loop: WorkerLoop, outputs: RunDir, rank: int):
        self.loop, self.outputs, self.rank = loop, outputs, rank

    def before_epoch(self, run: DistillRun, epoch: int) -> None:
        inject_fault_once(self.outputs, epoch, self.loop.fault, self.rank)

    def epoch_done(self, run: DistillRun, row: dict[str, Any], checkpoint_due: bool) -> None:
        role = self.loop.role
        tuned = role.kind == "tune"
        metrics = tune_metrics(row, run.history, role.selection, row["epoch_images"]) if tuned else ray_metrics(row)
        if not checkpoint_due:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            if self.rank == 0:
                write_checkpoint_dir(Path(directory), run.checkpoint_files())
            checkpoint = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)

    def diverged(self, run: DistillRun, row: dict[str, Any], error: DivergenceError) -> None:
        """Rank 0 has recorded the diverged epoch; the driver reads it from the metrics."""


def waited_for_resources() -> float:
    """Seconds this worker's group waited for its resources before Ray placed it: its placement group's
    end-to-end creation latency (Ray's record of it, from the request to the last bundle placed)."""
    group = ray.util.get_current_placement_group()
    if group is None:
        return 0.0
    stats = ray.util.placement_group_table(group).get("stats") or {}
    return stats.get("end_to_end_creation_latency_ms", 0.0) / 1000


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Every worker runs this; ``config["loop"]`` is the run's WorkerLoop."""
    loop: WorkerLoop = config["loop"]
    cfg = Config.model_validate(loop.config)
    rank = ray.train.get_context().get_world_rank()
    device = pick_device(cfg.train.device, ray.train.torch.get_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    outputs = RunDir(loop.outputs)
    run_distillation(
        cfg,
        loop.role,
        outputs if rank == 0 else None,
        TrainHooks(loop, outputs, rank),
        device=device,
        keep_best=loop.keep_best,
        started_at=loop.launched_at or time.time(),
        queued_s=waited_for_resources(),
        start=_worker_start(loop, outputs),
        stop_epoch=loop.stop_epoch,
        checkpoint_every=loop.checkpoint_every,
        finish=rank == 0 and loop.role.kind == "distill",
    )


def _worker_start(loop: WorkerLoop, outputs: RunDir) -> StartState | None:
    """The newest of Train's own checkpoint (a restart after a worker failure, or a resumed Train run; it wins a
    tie) and the state the loop names (a round's, or a resumed run's newest checkpoint from either mode)."""
    starts = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            starts.append(StartState(*read_checkpoint(Storage(directory)), where=outputs.uri_of(checkpoint.path)))
    if loop.start_state:
        state, meta = read_checkpoint(Storage(loop.start_state))
        starts.append(StartState(state, meta, where=loop.start_state, exploit=loop.exploit))
    return max(starts, key=lambda s: s.epoch) if starts else None


def registered_checkpoints(run: RunDir) -> set[str] | None:
    """The checkpoint directories Ray Train took in for this run (its checkpoint manager's record); None when
    Ray Train never recorded one there (an in-process run)."""
    try:
        result = ray.train.Result.from_path(run.root, storage_filesystem=run.fs)
    except RuntimeError:  # no record of a Train run in that directory
        return None
    return {Path(checkpoint.path).name for checkpoint, _ in result.best_checkpoints}


def prepare_teacher(cfg: Config) -> Config:
    """The teacher made ready before any worker needs it, where the workers run (``on_worker_resources``): resolved
    (trained when ``teacher.weights=auto`` finds none), loaded once, so a teacher that does not fit fails here,
    and its probe set made; workers then only read them. Returns the config naming the teacher's file."""
    cfg = ensure_teacher(cfg, False)
    teacher = load_teacher(cfg)
    if cfg.eval.probe_per_class:
        load_or_make_probe(teacher, cfg.eval, pick_device(cfg.train.device))
    return cfg


def on_worker_resources(gpus: float, task, *args) -> Any:
    """Run ``task`` where the trial's workers would run: on a GPU node when the run uses GPUs. A user error
    there (a missing data.root, a teacher that does not fit) reaches the driver as itself, not wrapped in
    Ray's traceback, so the CLI reports it in one line."""
    try:
        return ray.get(ray.remote(num_cpus=1, num_gpus=gpus)(task).remote(*args))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, InputError):
            raise err.cause from None
        raise


def scaling(workers: int, gpus_per_worker: float, cpus_per_worker: float) -> ScalingConfig:
    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    return ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources)


def build_trainer(
    loop: WorkerLoop,
    shape: ScalingConfig,
    name: str,
    storage: Storage,
    recovery: Recovery,
    keep: int,
    callbacks: list | None = None,
) -> TorchTrainer:
    """The TorchTrainer of a run (a distillation, a tuning trial, a round of one) named ``name`` under
    ``storage``, keeping its last ``keep`` checkpoints and recovering as ``recovery`` says. A worker group's start
    that waits past the start timeout (or fails) counts as a restart: Ray Train would otherwise retry it forever."""
    os.environ[START_TIMEOUT_VAR] = str(recovery.start_timeout_s)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=shape,
        torch_config=TorchConfig(timeout_s=int(recovery.collective_timeout_s)),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.uri(),
            failure_config=FailureConfig(recovery.max_restarts, controller_failure_limit=recovery.max_restarts),
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
            callbacks=callbacks,
        ),
    )


def failure_reason(err: ray.train.TrainingFailedError, recovery: Recovery, workers: str) -> str:
    """Why a Train run failed for good, in a line: a worker group that never got its resources, or workers that
    failed more often than allowed."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError  # the one public class wraps it

    if isinstance(err, ray.train.ControllerError) and isinstance(
        err.controller_failure, WorkerGroupStartupTimeoutError
    ):
        return (
            f"to start: its {workers} did not get their resources within --start-timeout {recovery.start_timeout_s:g} "
            f"s (other jobs hold them, or the autoscaler could not add nodes); free them or raise --start-timeout"
        )
    return f"after {recovery.max_restarts} allowed worker-group restart(s): {str(err).splitlines()[0]}"


def check_gpus_per_worker(workers: int, gpus_per_worker: float, how: str) -> None:
    """A DDP worker uses one GPU: more would sit idle (model parallelism is out of scope), and two NCCL ranks on
    one GPU are refused by NCCL. ``how`` names the options that set the share, for the message. Fractional GPUs
    stay allowed for a single worker."""
    if gpus_per_worker > 1:
        raise InputError(
            f"{how} gives each worker {gpus_per_worker:g} GPUs, and cpsc-ray runs one GPU per worker (data parallel; "
            f"model parallelism is out of scope), so the rest would sit idle: ask for one worker per GPU instead"
        )
    if workers > 1 and gpus_per_worker % 1:
        whole = max(1, round(gpus_per_worker))
        raise InputError(
            f"{how} gives each of the {workers} DDP workers {gpus_per_worker:g} GPU, and NCCL refuses two ranks "
            f"on one GPU: give each worker a whole number of GPUs ({whole}), or run a single worker"
        )


def run_distributed(
    cfg: Config,
    workers: int,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    storage: str | None = None,
    recovery: Recovery | None = None,
    resume: str | None = None,
    fault: Fault | None = None,
    autoscaling: bool = False,
    or_start: bool = False,
) -> dict[str, Any]:
    """One distillation over ``workers`` Ray Train workers (or with ``resume`` the named run, continued from its
    newest complete checkpoint; ``or_start``: started over when it has none); returns its summary."""
    request = _worker_request(cfg, workers, gpus_per_worker, cpus_per_worker)
    recovery = recovery or Recovery()
    if storage:
        cfg = cfg.model_copy(update={"output_dir": storage})
    cfg = with_absolute_paths(cfg)  # before Ray starts: its workers inherit the absolute CPSC_RAY_CACHE
    if not ray.is_initialized():
        ray.init()
    check_fits(request, autoscaling)  # before the run directory exists: a refused request writes nothing
    if resume:  # the resumed run's own config
        cfg, outputs, name = open_run(cfg, resume)
    cfg = on_worker_resources(gpus_per_worker, prepare_teacher, cfg)
    root = RootDir(cfg.output_dir)
    check_every_node_reads(root, cfg)
    if not resume:  # a new run directory only once its teacher is known to load and every node reads it
        cfg, outputs, name = open_run(cfg, None)
    newest = resume_point(outputs, name, registered_checkpoints(outputs), or_start) if resume else None
    loop = WorkerLoop(
        config=cfg.model_dump(),
        outputs=outputs.uri(),
        role=RunRole(kind="distill", experiment=name),
        fault=fault,
        start_state=outputs.uri(newest) if newest else None,
        launched_at=time.time(),
    )
    shape = scaling(workers, gpus_per_worker, cpus_per_worker)
    # Ray Train's run directory is the run's: <root>/<name>.
    _fit(build_trainer(loop, shape, name, root, recovery, keep=2), request, recovery, outputs, name)
    return _finished(root, outputs, name)


def _worker_request(cfg: Config, workers: int, gpus_per_worker: float, cpus_per_worker: float) -> Request:
    """What the run asks of the cluster, once the config and the options agree (before Ray starts)."""
    if cfg.train.batch_size % workers:
        raise InputError(f"train.batch_size={cfg.train.batch_size} must be divisible by --workers {workers}")
    how = f"--workers {workers} --gpus-per-worker {gpus_per_worker:g} --cpus-per-worker {cpus_per_worker:g}"
    check_gpus_per_worker(workers, gpus_per_worker, how)
    check_model_names(cfg)
    return Request(workers, cpus_per_worker, gpus_per_worker, how)


def _fit(trainer: TorchTrainer, request: Request, recovery: Recovery, outputs: RunDir, name: str) -> None:
    """Run the trainer, saying what it waits for; a run that fails for good raises a DistributedRunError."""
    try:
        with announcing_waits(request):
            trainer.fit()
    except ray.train.TrainingFailedError as err:
        kept = "its checkpoints are kept there" if newest_checkpoint(outputs) else "it wrote no checkpoint yet"
        raise DistributedRunError(
            f"run {name} failed {failure_reason(err, recovery, request.describe())}; {kept} ({outputs.uri()}): "
            f"continue it with --resume {name}"
        ) from None


def _finished(root: RootDir, outputs: RunDir, name: str) -> dict[str, Any]:
    """The summary of a run that ran to its end, its rows published; a diverged run's error."""
    history = outputs.metric_rows()
    if not outputs.exists(RunDir.SUMMARY):
        raise DistributedRunError(
            f"run {name} diverged in epoch {history[-1]['epoch']} (a loss became NaN or infinite); its metrics are "
            f"in {outputs.uri(RunDir.METRICS)}: {DIVERGENCE_FIX}"
        )
    publish(root, name, history, [])
    summary = outputs.read_json(RunDir.SUMMARY)
    summary["run_dir"] = outputs.uri()
    return summary
