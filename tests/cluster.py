"""A real multi-node Ray cluster on this one machine, for tests that need more than one node.

Each node is its own ``ray start`` with its own temp folder and its own free ports, so several
clusters (and a developer's own Ray) can run side by side on one machine. Every process of a
node is found again from that folder in its command line (the head's Ray Client server, which
lacks it, from its port) and from the process tree below those: a node can be killed on its
own to simulate a lost machine, and ``shutdown`` never touches a process that is not this
cluster's.

Token auth: ``ray start --head`` in Ray 2.60 turns token auth on by itself when a token exists
(``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``), while a worker node or a driver given an address
never does: it must run with ``RAY_AUTH_MODE=token`` itself. So that the result does not depend on the machine's home folder, every
node of a cluster gets ``RAY_AUTH_MODE=token`` and a fresh ``RAY_AUTH_TOKEN`` (the token
loader's first source, ahead of ``RAY_AUTH_TOKEN_PATH`` and ``~/.ray/auth_token``), which is
never written to disk. Drivers use ``client_env()``; HTTP clients use ``auth_headers``.

Lost nodes: the GCS marks a node dead after ``health_check_failure_threshold`` failed health
checks ``health_check_period_ms`` apart (defaults 5 x 3 s, after a 5 s initial delay). The
``RAY_health_check_*`` variables in ``FAST_HEALTH_CHECKS`` make that about 5 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import TracebackType

import psutil

RAY = os.path.join(os.path.dirname(sys.executable), "ray")

# Every port a node would otherwise take from Ray's fixed defaults, which a second Ray holds.
NODE_PORT_OPTIONS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)
HEAD_PORT_OPTIONS = ("port", "dashboard-port", "ray-client-server-port")

FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "3000",
    "RAY_health_check_failure_threshold": "5",
}
# Inherited values would point a node or a driver at another cluster or another token.
FOREIGN_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def free_ports(count: int, taken: set[int]) -> list[int]:
    """``count`` distinct free ports, none in ``taken``; the sockets stay open until all are picked."""
    with ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port not in taken:
                ports.append(port)
        return ports


@dataclass
class Node:
    """One ``ray start`` on this machine: where it lives and how to find its processes."""

    temp_dir: str
    ports: dict[str, int]
    num_cpus: int
    resources: dict[str, float]
    head: bool
    node_id: str = ""
    raylet_pid: int = 0
    killed: bool = False
    node_ip: str = ""  # empty: the address Ray picks; set for a node in its own netns
    netns: str = ""  # a network namespace (``ip netns``) the node runs in, cut off by its link
    startup: subprocess.Popen[str] | None = field(default=None, repr=False)

    @property
    def match_ports(self) -> set[int]:
        """Ports that name this node's processes where its temp folder does not.

        Only the head's Ray Client server lacks the folder in its command line. A killed
        node's ports are free again and may be another program's by now.
        """
        return {self.ports["ray-client-server-port"]} if self.head and not self.killed else set()

    def processes(self) -> list[psutil.Process]:
        """This node's live processes: named by its temp folder or ports, and all they started.

        Workers and agents rename themselves (``ray::IDLE``, ``ray::DashboardAgent``), so only
        the process tree under the raylet finds them.
        """
        return own_processes([self.temp_dir], self.match_ports)

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.processes()}


def _names_port(args: list[str], ports: set[int]) -> bool:
    """Whether an option such as ``--port=<p>`` names one of ``ports``."""
    values = {str(p) for p in ports}
    for arg in args:
        name, _, value = arg.partition("=")
        if name.startswith("--") and "port" in name and value in values:
            return True
    return False


def _matches(args: list[str], temp_dirs: list[str], ports: set[int]) -> bool:
    if any(d in arg for d in temp_dirs for arg in args):
        return True
    return bool(ports) and any("ray" in arg for arg in args) and _names_port(args[1:], ports)


def own_processes(temp_dirs: list[str], ports: set[int]) -> list[psutil.Process]:
    """Processes naming one of ``temp_dirs`` or ``ports`` in their command line, with descendants."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid != os.getpid() and _matches(process.info["cmdline"] or [], temp_dirs, ports):
                found[process.pid] = process
                found.update({c.pid: c for c in process.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL, then wait so nothing is left half-dead when the caller goes on."""
    for process in processes:
        try:
            process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs(processes, timeout=10)


class LocalCluster:
    """A head and worker nodes, each a ``ray start`` on this machine; a context manager."""

    def __init__(
        self,
        token_auth: bool = True,
        object_store_mb: int = 128,
        env: dict[str, str] | None = None,
        node_ip: str = "",
    ) -> None:
        """``node_ip``: the address of the head and of every node not given its own, for a
        cluster that nodes in network namespaces join (``add_node_in``)."""
        self.token = os.urandom(32).hex() if token_auth else ""
        self.node_ip = node_ip
        self.object_store_mb = object_store_mb
        self.extra_env = dict(env or {})
        self.nodes: list[Node] = []
        self._ports: set[int] = set()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    @property
    def head(self) -> Node:
        if not self.nodes or not self.nodes[0].head:
            raise RuntimeError("start_head() first")
        return self.nodes[0]

    @property
    def gcs_address(self) -> str:
        """``127.0.0.1:<port>``, for ``ray.init(address=...)`` and ``ray start --address``."""
        return f"{self.node_ip or '127.0.0.1'}:{self.head.ports['port']}"

    @property
    def jobs_address(self) -> str:
        """The dashboard (Jobs API, state API): ``http://127.0.0.1:<dashboard port>``."""
        return f"http://127.0.0.1:{self.head.ports['dashboard-port']}"

    @property
    def auth_env(self) -> dict[str, str]:
        if self.token:
            return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        return {"RAY_AUTH_MODE": "disabled"}

    @property
    def auth_headers(self) -> dict[str, str]:
        """For HTTP clients of the dashboard, e.g. ``JobSubmissionClient(headers=...)``."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client_env(self) -> dict[str, str]:
        """The environment for a driver process: this cluster's address and token, no other's."""
        env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
        return {**env, **self.auth_env, "RAY_ADDRESS": self.gcs_address}

    def run_python(self, code: str, timeout: float = 120) -> str:
        """Run ``code`` in a fresh interpreter connected by ``client_env()``; its stdout.

        A separate process, because a test process may already hold a ``ray.init`` to another
        cluster, and Ray caches its auth mode and token once per process.
        """
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=self.client_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"driver failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done.stdout

    def start_head(self, num_cpus: float = 0, resources: dict[str, float] | None = None) -> Node:
        """The head: GCS, dashboard with the Jobs API, and a raylet with ``num_cpus`` CPUs."""
        if self.nodes:
            raise RuntimeError("this cluster already has a head")
        node = self._new_node(num_cpus, resources, head=True)
        self._launch(node)
        self._finish(node)
        return node

    def add_node(self, num_cpus: float = 1, resources: dict[str, float] | None = None) -> Node:
        """A worker node joined to the head; ``resources`` such as ``{"gpu_node": 1}``."""
        return self.add_nodes((num_cpus, resources))[0]

    def add_nodes(self, *specs: tuple[float, dict[str, float] | None]) -> list[Node]:
        """Several worker nodes started at once: ``ray start`` costs seconds each."""
        if not self.nodes:
            raise RuntimeError("start_head() first")
        nodes = [self._new_node(cpus, resources, head=False) for cpus, resources in specs]
        for node in nodes:
            self._launch(node)
        for node in nodes:
            self._finish(node)
        return nodes

    def add_node_in(
        self, netns: str, node_ip: str, num_cpus: float = 1, resources: dict[str, float] | None = None
    ) -> Node:
        """A worker node inside network namespace ``netns`` at ``node_ip`` (the caller makes
        both, with a route to the cluster's ``node_ip``): cutting its link loses it as a
        network partition would, while its processes live on."""
        if not self.node_ip:
            raise RuntimeError("a node in a network namespace needs LocalCluster(node_ip=...)")
        node = self._new_node(num_cpus, resources, head=False)
        node.netns, node.node_ip = netns, node_ip
        self._launch(node)
        self._finish(node)
        return node

    def kill(self, node: Node) -> None:
        """Lose ``node`` as a machine would: SIGKILL its raylet first, then all its processes."""
        processes = node.processes()
        kill_all([p for p in processes if p.pid == node.raylet_pid])
        kill_all(processes)
        node.killed = True

    def node_states(self) -> dict[str, str]:
        """Node id (hex) to ``ALIVE``/``DEAD`` as the GCS sees it; empty while it cannot tell."""
        url = f"{self.jobs_address}/api/v0/nodes?limit=10000&detail=true&timeout=10"
        request = urllib.request.Request(url, headers=self.auth_headers)
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                body = json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            return {}
        rows = body.get("data", {}).get("result", {}).get("result", [])
        return {row["node_id"]: row["state"] for row in rows}

    def alive_node_ids(self) -> set[str]:
        return {node_id for node_id, state in self.node_states().items() if state == "ALIVE"}

    def wait_for_nodes(self, n: int, timeout: float = 60) -> set[str]:
        """Until exactly ``n`` nodes are alive (so also after a kill); their ids."""
        self._wait(lambda: len(self.alive_node_ids()) == n, timeout, f"{n} alive nodes")
        return self.alive_node_ids()

    def wait_for_dead(self, node: Node, timeout: float = 20) -> None:
        """Until the GCS has marked ``node`` dead (its health checks failed)."""
        self._wait(lambda: self.node_states().get(node.node_id) == "DEAD", timeout, "node death")

    def shutdown(self) -> None:
        """Kill every process of this cluster (and only those), then remove its temp folders."""
        for node in self.nodes:
            if node.startup is not None and node.startup.poll() is None:
                node.startup.kill()
        ports = {p for n in self.nodes for p in n.match_ports}
        kill_all(own_processes([n.temp_dir for n in self.nodes], ports))
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        self.nodes.clear()

    def _wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if check():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout} s: {self.node_states()}")
            time.sleep(0.25)

    def _new_node(self, num_cpus: float, resources: dict[str, float] | None, head: bool) -> Node:
        if num_cpus != int(num_cpus):
            raise ValueError(f"ray start takes whole CPUs only, not {num_cpus}")
        options = NODE_PORT_OPTIONS + (HEAD_PORT_OPTIONS if head else ())
        ports = dict(zip(options, free_ports(len(options), self._ports), strict=True))
        self._ports.update(ports.values())
        temp_dir = tempfile.mkdtemp(prefix="bi-cluster-", dir="/tmp")
        node = Node(temp_dir, ports, int(num_cpus), dict(resources or {}), head)
        self.nodes.append(node)
        return node

    def _command(self, node: Node) -> list[str]:
        command = [RAY, "start", "--head"] if node.head else [RAY, "start", f"--address={self.gcs_address}"]
        command += [f"--{name}={port}" for name, port in node.ports.items()]
        command += [
            f"--temp-dir={node.temp_dir}",
            f"--num-cpus={node.num_cpus}",
            "--num-gpus=0",
            # Ray's memory resource has a flag of its own: ``{"memory": bytes}`` goes there
            f"--resources={json.dumps({k: v for k, v in node.resources.items() if k != 'memory'})}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            # Workers bind ports the OS picks: Ray's fixed 10002-19999 range is shared by all.
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]
        if "memory" in node.resources:
            command.append(f"--memory={int(node.resources['memory'])}")
        if node.head:
            command.append("--include-dashboard=true")
        if node.node_ip or self.node_ip:
            command.append(f"--node-ip-address={node.node_ip or self.node_ip}")
        if node.netns:
            command = ["ip", "netns", "exec", node.netns, *command]
        return command

    def _node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
        return {**env, **self.auth_env, **FAST_HEALTH_CHECKS, **self.extra_env}

    def _launch(self, node: Node) -> None:
        node.startup = subprocess.Popen(
            self._command(node),
            env=self._node_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def _finish(self, node: Node, timeout: float = 180) -> None:
        """Wait for ``ray start``, then learn the node's raylet and id and see it alive."""
        assert node.startup is not None
        _, stderr = node.startup.communicate(timeout=timeout)
        if node.startup.returncode != 0:
            kill_all(node.processes())
            raise RuntimeError(f"ray start failed for {node.temp_dir}:\n{stderr[-3000:]}")
        raylet = self._raylet(node)
        node.raylet_pid = raylet.pid
        node.node_id = _flag(raylet.cmdline(), "--node_id")
        self._wait(lambda: node.node_id in self.alive_node_ids(), 60, f"alive {node.node_id}")

    @staticmethod
    def _raylet(node: Node) -> psutil.Process:
        for process in node.processes():
            try:
                if process.name() == "raylet" and _flag(process.cmdline(), "--node_id"):
                    return process
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        raise RuntimeError(f"no raylet found for {node.temp_dir}")


def _flag(args: list[str], name: str) -> str:
    """The value of ``name=value`` in ``args``; empty if absent."""
    prefix = f"{name}="
    return next((a[len(prefix):] for a in args if a.startswith(prefix)), "")


@contextmanager
def served_store(cluster: LocalCluster, root: str, env: dict[str, str]) -> Iterator[object]:
    """A job store at ``root`` served by ``batchinf dispatcher`` running against ``cluster``
    (with ``env`` on top of the cluster's client environment; its log in ``root``)."""
    from batchinf.jobstore import JobStore

    log = open(os.path.join(root, "dispatcher.log"), "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "batchinf.cli", "dispatcher", "--address", cluster.jobs_address,
         "--store", root, "--poll", "1"],
        env={**cluster.client_env(), **env}, stdout=log, stderr=log,
    )
    try:
        yield JobStore.from_uri(root)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
