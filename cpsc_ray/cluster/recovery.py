"""How a Ray Train run recovers and how long it waits, where drivers stay when spot nodes go, and the failures that
rehearse it. Plain data without Ray, so that the command line shows its defaults without importing Ray."""

from __future__ import annotations

from dataclasses import dataclass

START_TIMEOUT_S = 1800.0  # a worker group's wait for resources: long enough for an autoscaler to boot GPU nodes
COLLECTIVE_TIMEOUT_S = 600.0  # well above a step and a checkpoint write, far below torch's 30 minutes
# What a driver (a job's, a multi-worker trial's) holds of --driver-resource, the custom resource of nodes that are
# not preempted: a node given 1000 of it holds that many drivers.
DRIVER_RESOURCE_SHARE = 0.001


@dataclass(frozen=True)
class Recovery:
    """Worker-group restarts after a worker fails (a preempted node's do not count: Ray Train retries those
    without limit); how long each start of the worker group may wait for its resources before it counts as a
    failed restart; how long a collective may wait for a rank that hangs before its peers fail, so that the group
    restarts from its checkpoint."""

    max_restarts: int = 0
    start_timeout_s: float = START_TIMEOUT_S
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S


@dataclass(frozen=True)
class Fault:
    """A failure to rehearse recovery with: one worker is killed (``crash``) or stops answering (``hang``, which
    its peers' collective timeout ends) at the start of ``epoch``."""

    epoch: int
    kind: str = "crash"  # crash | hang
