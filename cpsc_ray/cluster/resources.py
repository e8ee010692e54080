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


def worker_slots(request: Request, nodes: list[dict[str, float]]) -> int:
    """How many of the request's workers the nodes hold at once (a worker runs on one node)."""
    need = request.per_worker
    return sum(min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in need.items()) for node in nodes)


def check_fits(request: Request, autoscaling: bool = False) -> None:
    """Refuse a request the cluster can never hold whole. ``autoscaling``: the cluster adds nodes on
    demand, so a request larger than it is now may fit later and is let through."""
    if autoscaling or not request.per_worker:
        return
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    fits_cpus = request.groups * request.per_group["CPU"] <= sum(n.get("CPU", 0) for n in nodes) + 1e-9
    if fits_cpus and worker_slots(request, nodes) >= request.workers * request.groups:
        return
    have = ", ".join(
        f"{sum(n.get(k, 0) for n in nodes):g} {k} (largest node {max((n.get(k, 0) for n in nodes), default=0):g})"
        for k in request.per_worker
    )
    raise InputError(
        f"{request.how} asks for {request.describe()}, and this cluster of {len(nodes)} node(s) can never hold "
        f"that whole: it has {have}; ask for fewer or smaller workers (or trials at once), or pass --autoscaling "
        f"if the cluster adds nodes on demand"
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
