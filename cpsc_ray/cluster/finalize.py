"""``cpsc-ray finalize``: rerun the configuration an experiment selected from scratch over several
seeds, measure it, and export the student.

The selected configuration is the trial with the best selection metric (validation accuracy or the
proxy; never test accuracy). For PBT and PB2 that trial's hyperparameters changed along its
lineage, so its schedule is replayed, as Ray's ``PopulationBasedTrainingReplay`` does: the configs
of the trials whose state it inherited, each from the epoch it took effect.
"""

from __future__ import annotations

import io
import statistics
from typing import Any

import pandas as pd
import ray
import torch
from safetensors.torch import load

from cpsc_ray.cluster.reach import check_every_node_reads
from cpsc_ray.cluster.tune_setup import TuneSetup
from cpsc_ray.config import ConfigError, RunConfig, validate_tree, with_values
from cpsc_ray.method.engine import DivergenceError
from cpsc_ray.method.models import build_model
from cpsc_ray.results.lineage import Schedule, replay_schedule
from cpsc_ray.results.store import best_trial, publish, read_results
from cpsc_ray.runs.in_process import execute
from cpsc_ray.runs.setup import RunRole, new_run_name
from cpsc_ray.storage import Storage


def select(root: Storage, experiment: str) -> tuple[pd.Series, Schedule]:
    results = read_results([root.uri("results")], experiments=[experiment])
    winner = best_trial(results.trials[results.trials.kind == "tune"])
    if winner is None:
        raise ConfigError(
            f"finalize {experiment}: no finished, non-diverged trial with a score under {root.uri('results')}"
        )
    return winner, replay_schedule(results.epochs, results.lineage, winner.trial_id, int(winner.epochs))


def _configs(base: RunConfig, schedule: Schedule, seed: int, name: str, output_dir: str) -> list[tuple[int, RunConfig]]:
    fixed = {"seed": seed, "name": name, "output_dir": output_dir}
    return [(epoch, with_values(base, {**values, **fixed})) for epoch, values in schedule]


def _finalize_seed(
    configs: list[tuple[int, RunConfig]], outputs: str, final: str, trial_id: str, method: str, resume: bool
):
    """One seed's rerun (with ``resume``, continued from its newest checkpoint, or started over when it has
    none); a diverged seed returns no summary but keeps its rows (compute was spent)."""
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    storage = Storage(outputs)
    try:
        summary, history = execute(
            configs[0][1],
            storage,
            final,
            resume=resume,
            or_start=resume,
            progress=False,
            schedule=dict(configs[1:]),
            role=RunRole(kind="finalize", trial_id=trial_id, method=method),
        )
    except DivergenceError:
        return None, storage.read_parquet("metrics.parquet").to_pylist()
    export_student(storage)
    return summary, history


def export_student(run: Storage) -> None:
    """Beside best/student.safetensors and student.json: ``student.pt2``, a torch.export program
    that runs with plain PyTorch (``torch.export.load(path).module()(images)``)."""
    card = run.read_json("best/student.json")
    model = build_model(card["arch"], card["num_classes"], card["channels"], **card["kwargs"]).eval()
    model.load_state_dict(load(run.read_bytes("best/student.safetensors")))
    example = torch.zeros(2, card["channels"], card["input_size"], card["input_size"])
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    run.write_bytes("best/student.pt2", buffer.getvalue())


def finalize(
    experiment: str,
    seeds: int,
    storage: str | None = None,
    gpus: float = 0.0,
    cpus: float = 1.0,
    resume_or_start: bool = False,
) -> dict[str, Any]:
    """Rerun the experiment's selection over ``seeds`` seeds as ``<experiment>-final`` (``resume_or_start``:
    exactly that name, its seeds continued where they stopped; else a new name when it is taken)."""
    root = Storage(storage or ".")
    setup = TuneSetup.read(root, experiment)
    base = validate_tree(setup.base, f"{experiment}'s base config")
    winner, schedule = select(root, experiment)
    final = f"{experiment}-final" if resume_or_start else new_run_name(root, f"{experiment}-final")
    if not ray.is_initialized():
        ray.init()
    check_every_node_reads(root, base)
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_finalize_seed)
    pending = [
        task.remote(
            _configs(base, schedule, base.seed + 1000 + k, f"seed{k}", root.uri(final)),
            root.uri(final, f"seed{k}"),
            final,
            f"seed{k}",
            setup.method,
            resume_or_start,
        )
        for k in range(seeds)
    ]
    outcomes = ray.get(pending)
    summaries = [summary for summary, _ in outcomes if summary is not None]
    publish(root, final, [row for _, history in outcomes for row in history], [])
    chosen = [s["best"]["test_acc"] for s in summaries if s["best"]]
    result = {
        "experiment": experiment,
        "final": final,
        "winner": winner.trial_id,
        "winner_score": float(winner.score),
        "schedule": schedule,
        "seeds": seeds,
        "diverged": seeds - len(summaries),
        "test_at_best": chosen,
        "test_mean": statistics.mean(chosen) if chosen else None,
        "test_std": statistics.stdev(chosen) if len(chosen) > 1 else 0.0,
        "students": [Storage(s["run_dir"]).uri("best") for s in summaries],
    }
    root.write_json(f"{final}/finalize.json", result)
    return result
