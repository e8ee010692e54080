"""Whether a request fits the cluster. One that never can is refused before anything starts, naming the
request and the cluster; one that does not fit now is reported while it waits, once a minute, instead
of hanging silently while Train's controller retries its worker group."""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import ray

from cpsc_ray.errors import InputError

WAIT_NOTICE_S = float(os.environ.get("CPSC_RAY_WAIT_NOTICE_S", 60))  # tests shorten it


@dataclass(frozen=True)
class Request:
    """``groups`` worker groups (trials at once) of ``workers`` workers each, and ``group_cpus`` more for
    whatever drives each group (a multi-worker trial's trainable); ``how`` names the options that set it."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    how: str
    groups: int = 1
    group_cpus: float = 0.0

    @property
    def per_worker(self) -> dict[str, float]:
        return {k: v for k, v in {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}.items() if v > 0}

    @property
    def per_group(self) -> dict[str, float]:
        """What one group holds whole: its workers and what drives it."""
        return {
            "CPU": self.workers * self.cpus_per_worker + self.group_cpus,
            "GPU": self.workers * self.gpus_per_worker,
        }

    def describe(self) -> str:
        each = ", ".join(f"{v:g} {k}" for k, v in self.per_worker.items())
        driver = f" plus {self.group_cpus:g} CPU for the trial itself" if self.group_cpus else ""
        groups = f" x {self.groups} trials at once" if self.groups > 1 else ""
        return f"{self.workers} worker(s) of {each}{driver}{groups}"


@dataclass(frozen=True)
class NodeType:
    """A kind of node the cluster's autoscaler may start: its resources and how many at most (-1: no limit)."""

    name: str
    resources: dict[str, float]
    max_count: int

    def count(self, needed: int) -> int:
        """How many of them the cluster may hold, for a request that needs ``needed`` at most."""
        return needed if self.max_count < 0 else self.max_count


def autoscaler_node_types() -> list[NodeType] | None:
    """The node types the cluster's autoscaler may start, as it reported them to the GCS: its ClusterConfig's
    ``node_group_configs``, read with ``ray._private.state.state.get_cluster_config()``, the record Ray Train's
    own worker-group check and Ray Data's autoscaler read. None when no autoscaler reported any."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None:
        return None
    types = [
        NodeType(group.name, dict(group.resources), group.max_count)
        for group in config.node_group_configs
        if group.resources and group.max_count != 0
    ]
    return types or None


@dataclass(frozen=True)
class Capacity:
    """The nodes a request can ever have: those alive now and those the autoscaler may add (``types``)."""

    present: list[dict[str, float]]
    types: list[NodeType] | None

    @classmethod
    def of_cluster(cls) -> Capacity:
        return cls([node["Resources"] for node in ray.nodes() if node["Alive"]], autoscaler_node_types())

    def groups(self, request: Request, most: int) -> int:
        """How many of the request's worker groups (trials) the cluster holds whole at once at its largest, up
        to ``most`` (what an autoscaler without a limit could hold)."""
        needed = request.workers * most
        nodes = self.present + [t.resources for t in self.types or [] for _ in range(t.count(needed))]
        groups = worker_slots(request, nodes) // request.workers
        if request.per_group["CPU"]:
            groups = min(groups, int((sum(n.get("CPU", 0) for n in nodes) + 1e-9) // request.per_group["CPU"]))
        return min(groups, most)

    def describe(self, request: Request) -> str:
        nodes = self.present + [t.resources for t in self.types or []]
        have = ", ".join(
            f"{sum(n.get(k, 0) for n in self.present):g} {k} (largest node{' or node type' if self.types else ''} "
            f"{max((n.get(k, 0) for n in nodes), default=0):g})"
            for k in request.per_worker
        )
        scaling = "; ".join(f"{t.name} ({_shape(t.resources)}) up to {t.max_count}" for t in self.types or [])
        return f"{have} on {len(self.present)} node(s)" + (f", and its autoscaler may add {scaling}" if scaling else "")


def _shape(resources: dict[str, float]) -> str:
    return " ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU"))


def worker_slots(request: Request, nodes: list[dict[str, float]]) -> int:
    """How many of the request's workers the nodes hold at once (a worker runs on one node)."""
    need = request.per_worker
    return sum(min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in need.items()) for node in nodes)


def check_fits(request: Request, autoscaling: bool = False) -> None:
    """Refuse a request the cluster can never hold whole: not the nodes present, nor those its autoscaler may
    start. ``autoscaling``: the cluster adds nodes on demand though no autoscaler reported its node types, so
    a request larger than it is now is let through (and waits, up to the start timeout)."""
    if not request.per_worker:
        return
    capacity = Capacity.of_cluster()
    if capacity.types is None and autoscaling:
        return
    if capacity.groups(request, most=request.groups) >= request.groups:
        return
    hint = "" if capacity.types else ", or pass --autoscaling if the cluster adds nodes on demand"
    raise InputError(
        f"{request.how} asks for {request.describe()}, and this cluster can never hold that whole: it has "
        f"{capacity.describe(request)}; ask for fewer or smaller workers (or trials at once){hint}"
    )


def check_resource_exists(name: str, option: str, autoscaling: bool = False) -> None:
    """Refuse a custom resource that no node has and no node type the autoscaler may start carries: whatever
    asks for it would wait forever."""
    capacity = Capacity.of_cluster()
    nodes = capacity.present + [t.resources for t in capacity.types or []]
    if any(node.get(name, 0) > 0 for node in nodes) or (capacity.types is None and autoscaling):
        return
    raise InputError(
        f"{option} {name}: no node of this cluster carries that resource; give it to the nodes that should hold "
        f"the trials' own processes (ray start --resources='{{\"{name}\": 1000}}', or the node type's resources in "
        f"launch/cluster.yaml and launch/rayjob.yaml)"
    )


def pending_groups() -> list[dict]:
    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "PENDING"]


@contextmanager
def announcing_waits(request: Request) -> Iterator[None]:
    """While the body runs, say once a minute (``WAIT_NOTICE_S``) what it waits for when worker groups
    are pending for want of resources."""
    every = WAIT_NOTICE_S
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every):
            waiting = pending_groups()
            if waiting:
                free = ray.available_resources()
                print(
                    f"waiting for resources: {len(waiting)} worker group(s) pending, for {request.describe()}; "
                    f"free now: {', '.join(f'{free.get(k, 0):g} {k}' for k in request.per_worker)} "
                    f"(held by other jobs, trials, or this job's own --entrypoint-num-cpus)",
                    flush=True,
                )

    watcher = threading.Thread(target=watch, name="resource-wait-notice", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
