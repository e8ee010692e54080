"""The one epoch loop: every entry point trains through ``runs.loop.run_epochs``, and only there is an
epoch run and a checkpoint decided."""

from __future__ import annotations

import ast
from pathlib import Path

import cpsc_ray
from cpsc_ray.runs import loop
from cpsc_ray.runs.in_process import run_in_process

PACKAGE = Path(cpsc_ray.__file__).parent
ENTRY_POINTS = {  # module -> the functions that run a distillation there
    "runs/in_process.py": {"train_into"},
    "cluster/train.py": {"train_loop_per_worker"},
    "cluster/tune/trial.py": {"_trial_in_process"},
}


def calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    named = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            named.append((name, node))
    return named


def test_only_the_loop_runs_epochs_and_every_entry_point_calls_it():
    callers = {"run_epoch": set(), "train_epoch": set(), "checkpoint_due": set(), "run_epochs": set()}
    for path in PACKAGE.rglob("*.py"):
        for name, _ in calls(ast.parse(path.read_text())):
            if name in callers:
                callers[name].add(str(path.relative_to(PACKAGE)))
    assert callers["run_epoch"] == {"runs/loop.py"}, "an epoch is run only by the one loop"
    assert callers["checkpoint_due"] == {"runs/loop.py"}, "checkpoints (and PBT boundaries) are decided there"
    assert callers["train_epoch"] == {"runs/run.py"}, "the engine is stepped only through DistillRun"
    assert callers["run_epochs"] == {"runs/assembly.py"}, "a run is assembled and looped in one place"

    for module, functions in ENTRY_POINTS.items():
        tree = ast.parse((PACKAGE / module).read_text())
        defined = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
        for function in functions:
            assert any(name == "run_distillation" for name, _ in calls(defined[function])), f"{module}:{function}"


def test_an_in_process_run_goes_through_the_loop_and_checkpoints_where_it_decides(tiny_cfg, monkeypatch):
    decided = []
    real = loop.checkpoint_due

    def spy(epoch: int, every: int, stop_epoch: int) -> bool:
        decided.append((epoch, every, stop_epoch, real(epoch, every, stop_epoch)))
        return decided[-1][-1]

    monkeypatch.setattr(loop, "checkpoint_due", spy)
    run_in_process(tiny_cfg.model_copy(update={"name": "spied"}), progress=False)
    assert [d[0] for d in decided] == [1, 2]  # TINY runs 2 epochs
    assert decided[-1][-1] is True  # the last epoch always checkpoints


def test_checkpoints_fall_on_every_boundary_and_at_the_stop():
    due = [e for e in range(1, 11) if loop.checkpoint_due(e, every=3, stop_epoch=10)]
    assert due == [3, 6, 9, 10]
    assert [e for e in range(5, 8) if loop.checkpoint_due(e, every=4, stop_epoch=7)] == [7]


def test_a_run_that_goes_on_from_its_own_state_drops_the_clones_recorded_after_it(tiny_cfg, tmp_path):
    """A PBT trial whose clone the experiment forgot (its driver died before a snapshot named it) restarts from its
    own checkpoint: the loop leaves its lineage at the path its state took."""
    from dataclasses import asdict

    from cpsc_ray.config import with_values
    from cpsc_ray.layout import RunDir
    from cpsc_ray.results.lineage import Clone, read_lineage
    from cpsc_ray.runs.in_process import train_into

    outputs = RunDir(str(tmp_path / "trial"))
    train_into(tiny_cfg, outputs, "trial", progress=False)  # its own checkpoint at epoch 2
    recorded = [
        Clone("t_00001", epoch, f"/elsewhere/t_00001/{epoch}", None, {}, "digest", 0.1, 0.01, {}) for epoch in (1, 2)
    ]
    outputs.write_json(RunDir.LINEAGE, [asdict(c) for c in recorded])
    train_into(with_values(tiny_cfg, {"train.epochs": 3}), outputs, "trial", resume=True, progress=False)
    assert read_lineage(outputs) == recorded[:1]
