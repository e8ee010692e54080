"""Real Ray nodes on this machine for tests: a head and worker nodes, each ``ray start --block`` with its
own temp dir, free ports and the head's auth token, so they neither join nor disturb the session's
``ray_local`` instance or other Ray clusters on the machine. Each node runs in its own process session
and is stopped by signalling that session only (``ray stop`` would stop every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE_START_S = 120
RAY = str(Path(sys.executable).parent / "ray")
WORKER_PORTS = 100
_windows_given: set[int] = set()  # worker-port windows of nodes this process started: never shared


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_window(size: int) -> int:
    """The first port of ``size`` consecutive free ports, for a node's workers: tried in random order so
    that concurrent test sessions rarely pick the same window, and never one given to another node here
    (a node binds its workers' ports only as it starts them)."""
    windows = range(20000, 30000, size)
    for first in random.sample(windows, len(windows)):
        if first in _windows_given:
            continue
        try:
            for port in range(first, first + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _windows_given.add(first)
        return first
    raise RuntimeError("no window of free ports for Ray's workers")


def session_members(session: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    members.append(int(entry))
            except OSError:
                pass
    return members


def working_in(directory: Path) -> list[int]:
    """Processes whose working directory is under ``directory``: a job's driver runs in its unpacked
    working dir below the head's temp dir, in a process session of its own."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(os.readlink(f"/proc/{entry}/cwd")).is_relative_to(directory):
                    members.append(int(entry))
            except OSError:
                pass
    return members


@dataclass
class Node:
    proc: subprocess.Popen  # ``ray start --block``, the leader of the node's process session
    temp: Path

    @property
    def log(self) -> str:
        return (self.temp / "node.log").read_text()


@dataclass
class Head:
    url: str
    token: str
    gcs_port: int
    env: dict[str, str]  # for clients and worker nodes: the token, this venv's tools, no RAY_ADDRESS
    node: Node


def start_node(env: dict[str, str], *args: str, wrapper: Sequence[str] = ()) -> Node:
    """``ray start --block`` with ``args``, its own temp dir and free ports, not waited for; ``wrapper`` runs it
    (and so the node's every process), e.g. in a mount namespace of its own. Ray resolves 127.0.0.1 to the
    machine's address, so the nodes find each other as on a real network."""
    agent, agent_grpc, runtime_env_agent, metrics, node_manager, objects = free_ports(6)
    workers = free_port_window(WORKER_PORTS)
    temp = Path(tempfile.mkdtemp(prefix="cpsc-ray-node-"))  # short: Ray's socket paths live under it
    command = [
        *wrapper,
        RAY,
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-gpus=0",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={objects}",
        f"--min-worker-port={workers}",
        f"--max-worker-port={workers + WORKER_PORTS - 1}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *args,
    ]
    with (temp / "node.log").open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Node(proc, temp)


def stop_node(node: Node) -> list[int]:
    """Stop a node: ``ray start --block`` tears its processes down on SIGTERM; whatever remains in its
    session, or still works in its temp dir (a job driver that outlived its job), is killed, and the temp
    dir removed. Returns what had to be killed."""
    proc = node.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    remaining = lambda: sorted(set(session_members(proc.pid)) | set(working_in(node.temp)))  # noqa: E731
    deadline = time.monotonic() + 20
    while remaining() and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = remaining()
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(node.temp, ignore_errors=True)
    return leftovers


def kill_node(node: Node) -> None:
    """SIGKILL every process of the node, as if its machine were lost; returns once they are gone. Its
    whole session, not its process group: Ray's workers lead process groups of their own; and a job's driver,
    which runs in a session of its own, in the job's working dir under the node's temp dir."""
    deadline = time.monotonic() + 20
    while members := sorted(set(session_members(node.proc.pid)) | set(working_in(node.temp))):
        assert time.monotonic() < deadline, f"processes of the killed node live on: {members}"
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.proc.poll()  # reaps ``ray start`` itself, a child of this process
        time.sleep(0.1)


def ask(head: Head, path: str, params: Sequence[tuple[str, str]] = ()) -> dict:
    """A GET to the head's dashboard (its JSON answer), with the head's token."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    request = urllib.request.Request(f"{head.url}{path}{query}", headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def listed(head: Head, resource: str, **equal: str) -> list[dict]:
    """Ray's state API through the dashboard: every ``resource`` (nodes, actors, ...), dead ones included,
    whose fields named in ``equal`` have the given values."""
    params = [("detail", "true"), ("limit", "10000")]
    for key, value in equal.items():
        params += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
    answer = ask(head, f"/api/v0/{resource}", params)
    assert answer["result"], answer["msg"]
    return answer["data"]["result"]["result"]


def alive_worker_nodes(head: Head) -> set[str]:
    return {n["node_id"] for n in listed(head, "nodes", state="ALIVE") if not n["is_head_node"]}


@contextmanager
def running_head(num_cpus: int, *args: str, env: dict[str, str] | None = None) -> Iterator[Head]:
    """A head with the dashboard and its job server, stopped on exit; fails if a process outlives it. ``args``
    go to its ``ray start``; ``env`` is added to the environment of its processes, its worker nodes' and clients'."""
    gcs, dashboard, client = free_ports(3)
    token = secrets.token_hex(16)
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(extra)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # a stopped node waits up to 30 s for its leases otherwise
    )
    node = start_node(
        env,
        "--head",
        f"--port={gcs}",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        *args,
    )
    head = Head(f"http://127.0.0.1:{dashboard}", token, gcs, env, node)
    try:
        deadline = time.monotonic() + NODE_START_S
        while True:
            assert node.proc.poll() is None, f"ray start exited ({node.proc.returncode}):\n{node.log}"
            try:
                ask(head, "/api/version")
                break
            except OSError:
                assert time.monotonic() < deadline, f"head not up after {NODE_START_S} s:\n{node.log}"
                time.sleep(1)
        yield head
    finally:
        leftovers = stop_node(node)
    assert not leftovers, f"processes of the head outlived it: {leftovers}"


def alive_worker_nodes_once_answered(head: Head, deadline: float) -> set[str]:
    """alive_worker_nodes, asked again while the head's state API drops the connection: it starts in a process
    of its own after the dashboard answers, later on a busy machine."""
    while True:
        try:
            return alive_worker_nodes(head)
        except OSError:
            assert time.monotonic() < deadline, f"the head's state API does not answer:\n{head.node.log}"
            time.sleep(1)


def start_worker_node(head: Head, num_cpus: int, wrapper: Sequence[str] = ()) -> tuple[Node, str]:
    """A worker node joined to ``head`` (run by ``wrapper``, see start_node), and its node id once the head
    lists it alive."""
    deadline = time.monotonic() + NODE_START_S
    before = alive_worker_nodes_once_answered(head, deadline)
    node = start_node(head.env, f"--address=127.0.0.1:{head.gcs_port}", f"--num-cpus={num_cpus}", wrapper=wrapper)
    try:
        while not (joined := alive_worker_nodes_once_answered(head, deadline) - before):
            assert node.proc.poll() is None, f"ray start exited ({node.proc.returncode}):\n{node.log}"
            assert time.monotonic() < deadline, f"worker node not up after {NODE_START_S} s:\n{node.log}"
            time.sleep(0.5)
    except BaseException:
        stop_node(node)
        raise
    return node, joined.pop()


def with_a_directory_of_its_own(directory: Path) -> list[str] | None:
    """A wrapper for start_node: the node's processes see an empty tmpfs at ``directory`` (a mount namespace of
    their own), as a node would that has a local disk where the others mount shared storage. Needs root, or
    user namespaces (the node's processes are then root in one of their own); None where neither is allowed."""
    unshare = ["unshare", *([] if os.geteuid() == 0 else ["--map-root-user"]), "--mount", "--propagation", "private"]
    wrapper = [*unshare, "sh", "-c", 'mount -t tmpfs cpsc-ray-elsewhere "$0" && exec "$@"', str(directory)]
    allowed = subprocess.run([*wrapper, "true"], capture_output=True, check=False).returncode == 0
    return wrapper if allowed else None


def copy_of_the_code(root: Path) -> Path:
    """``root`` holding a copy of the repository's code, for a job to upload as its working dir."""
    for name in ("cpsc_ray", "search_spaces", "launch"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root)
    return root


class Proxy:
    """A TCP forwarder on the loopback to a local port, which ``drop`` takes down (its listener and every
    connection through it) for a while and brings back on the same port, as a lost network path would."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        self._open()

    def _open(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the port comes back at once
        self._sockets = [listener]
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def close(self) -> None:
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def drop(self, seconds: float) -> None:
        """Refuse every connection for ``seconds``, then forward again."""
        self.close()
        time.sleep(seconds)
        self._open()
