"""Storage every node can read, checked before anything trains. Runs, checkpoints and results go to one
location that every node must see as the same place: a worker restarted on another node reads the checkpoints
rank 0 wrote, a trial reads its metrics wherever it runs, evaluation reads ``data.root``, every worker loads the
teacher and its probe set, and teachers trained for ``teacher.weights=auto`` are cached under ``CPSC_RAY_CACHE``.
A node-local path passes every check on one machine and fails days later on the next, so on a cluster of two
or more nodes the driver writes a marker under the storage and one small task per alive node reads it back
and looks for the other paths; a node that cannot is named in a one-line error.
"""

from __future__ import annotations

import os
import uuid

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cpsc_ray.config import Config
from cpsc_ray.errors import InputError
from cpsc_ray.storage import Storage

MARKER_PREFIX = ".cpsc-ray-reach-"  # dot-prefixed, so listings of runs and results skip it while it is there
ANSWER_S = 300.0  # a node starts a worker for the task first (and the job's runtime env, the first time)


def _unreadable(marker: str, token: str, paths: dict[str, str]) -> list[str]:
    """On one node: what it cannot read of the driver's marker and of ``paths`` (what -> path or URI)."""
    missing = []
    folder, name = Storage.of_file(marker)
    try:
        seen = folder.read_text(name) == token
    except Exception:  # noqa: BLE001 - pyarrow raises many types for a store it cannot reach
        seen = False
    if not seen:
        missing.append(f"the storage (the marker {marker} the driver wrote there)")
    cache = os.environ.get("CPSC_RAY_CACHE")
    for what, path in {**paths, **({"CPSC_RAY_CACHE": cache} if cache else {})}.items():
        if "://" in path:
            folder, name = Storage.of_file(path)
            readable = folder.exists(name)
        else:
            readable = os.access(path, os.R_OK)
        if not readable:
            missing.append(f"{what} {path}")
    return missing


def paths_to_check(cfg: Config) -> dict[str, str]:
    """What every node reads besides the storage: the data (when the dataset has files) and the teacher."""
    paths = {"teacher.weights": cfg.teacher.weights} if cfg.teacher.weights not in (None, "auto") else {}
    return {**paths, **({"data.root": cfg.data.root} if cfg.data.root else {})}


def check_every_node_reads(storage: Storage, cfg: Config) -> None:
    """Refuse, naming the node, storage or paths that some alive node cannot read; a single node is not checked."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    marker = f"{MARKER_PREFIX}{token}"  # a file of its own beside the runs, deleted after: nothing is left behind
    storage.write_text(marker, token)
    look = ray.remote(num_cpus=0)(_unreadable)
    try:
        pending = {
            look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
                storage.uri(marker), token, paths_to_check(cfg)
            ): node
            for node in nodes
        }
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=ANSWER_S)
        seen = {pending[ref]["NodeID"]: ray.get(ref) for ref in ready}
    finally:
        storage.fs.delete_file(storage.path(marker))  # only this check's: another run may be checking too
    problems = [f"node {_name(pending[ref])} did not answer within {ANSWER_S:g} s" for ref in late]
    problems += [f"node {_name(n)} cannot read {', '.join(seen[n['NodeID']])}" for n in nodes if seen.get(n["NodeID"])]
    if problems:
        raise InputError(
            f"{'; '.join(problems)}: every node must see the same storage, data and teacher; mount them at the same "
            f"path on every node (a shared filesystem) or give URIs (s3://, gs://) that every node can reach"
        )


def _name(node: dict) -> str:
    return f"{node['NodeID'][:12]} ({node['NodeManagerAddress']})"
