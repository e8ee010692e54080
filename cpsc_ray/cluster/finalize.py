"""``cpsc-ray finalize``: rerun the configuration an experiment selected from scratch over several
seeds, measure it, and export the student.

The selected configuration is the trial with the best selection metric (validation accuracy or the
proxy; never test accuracy). For PBT and PB2 that trial's hyperparameters changed along its
lineage, so its hyperparameter phases are replayed, as Ray's ``PopulationBasedTrainingReplay`` does: the configs
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
from cpsc_ray.cluster.tune.record import ExperimentRecord
from cpsc_ray.config import Config, validate_tree, with_values
from cpsc_ray.errors import InputError
from cpsc_ray.layout import ExperimentDir, RootDir, RunDir
from cpsc_ray.method.engine import DivergenceError
from cpsc_ray.method.models import build_model
from cpsc_ray.results.replay import Phases, lineage_phases
from cpsc_ray.results.tables import best_trial, publish, read_results
from cpsc_ray.runs.assembly import RunRole
from cpsc_ray.runs.in_process import train_into


def select(root: RootDir, experiment: str) -> tuple[pd.Series, Phases]:
    results = read_results([root.results().uri()], experiments=[experiment])
    winner = best_trial(results.trials[results.trials.kind == "tune"])
    if winner is None:
        raise InputError(
            f"finalize {experiment}: no finished, non-diverged trial with a score under {root.results().uri()}"
        )
    return winner, lineage_phases(results.epochs, results.lineage, winner.trial_id, int(winner.epochs))


def _configs(base: Config, phases: Phases, seed: int, name: str, output_dir: str) -> list[tuple[int, Config]]:
    fixed = {"seed": seed, "name": name, "output_dir": output_dir}
    return [(epoch, with_values(base, {**values, **fixed})) for epoch, values in phases]


def _finalize_seed(configs: list[tuple[int, Config]], outputs: str, role: RunRole, resume: bool):
    """One seed's rerun (with ``resume``, continued from its newest checkpoint, or started over when it has
    none); a diverged seed returns no summary but keeps its rows (compute was spent)."""
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    run = RunDir(outputs)
    try:
        summary, history = train_into(
            configs[0][1],
            run,
            role.experiment,
            resume=resume,
            or_start=resume,
            progress=False,
            phases=dict(configs[1:]),
            role=role,
        )
    except DivergenceError:
        return None, run.metric_rows()
    export_student(run)
    return summary, history


def export_student(run: RunDir) -> None:
    """Beside best/student.safetensors and student.json: ``student.pt2``, a torch.export program
    that runs with plain PyTorch (``torch.export.load(path).module()(images)``)."""
    card = run.read_json(RunDir.BEST_CARD)
    model = build_model(card["arch"], card["num_classes"], card["channels"], **card["kwargs"]).eval()
    model.load_state_dict(load(run.read_bytes(RunDir.BEST_WEIGHTS)))
    example = torch.zeros(2, card["channels"], card["input_size"], card["input_size"])
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    run.write_bytes(RunDir.BEST_PROGRAM, buffer.getvalue())


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
    root = RootDir(storage or ".")
    record = ExperimentRecord.read(root, experiment)
    base = validate_tree(record.base, f"{experiment}'s base config")
    winner, phases = select(root, experiment)
    final = f"{experiment}-final" if resume_or_start else root.free_name(f"{experiment}-final")
    final_dir = root.experiment(final)
    if not ray.is_initialized():
        ray.init()
    check_every_node_reads(root, base)
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_finalize_seed)
    roles = [
        RunRole(
            kind="finalize", experiment=final, trial_id=f"seed{k}", method=record.method, source_experiment=experiment
        )
        for k in range(seeds)
    ]
    pending = [
        task.remote(
            _configs(base, phases, base.seed + 1000 + k, role.trial_id, final_dir.uri()),
            final_dir.seed_run(role.trial_id).uri(),
            role,
            resume_or_start,
        )
        for k, role in enumerate(roles)
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
        "schedule": phases,  # the key finalize.json has always had
        "seeds": seeds,
        "diverged": seeds - len(summaries),
        "test_at_best": chosen,
        "test_mean": statistics.mean(chosen) if chosen else None,
        "test_std": statistics.stdev(chosen) if len(chosen) > 1 else 0.0,
        "students": [RunDir(s["run_dir"]).uri(RunDir.BEST) for s in summaries],
    }
    final_dir.write_json(ExperimentDir.FINALIZE, result)
    return result
