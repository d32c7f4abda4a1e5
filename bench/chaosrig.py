"""Everything a chaos run stands on, on this machine, and nothing it did not start itself.

    moto's S3 server (127.0.0.1) ◄── bench/faultproxy.py (S3 faults in windows)
                                          ▲  (through a relay on the bridge, with --netns)
    a multi-node Ray cluster (tests/cluster.py) ─ nodes' AWS_ENDPOINT_URL
    bench/chaosproxy.py's LaunchGate ─► the head's dashboard / Jobs API (refuses launches)
    ``batchinf dispatcher --address <the gate> --store <store>``, restarted when it dies
    a watcher that notes when each part file of each job's output first appears

The dispatcher is supervised as systemd would (``Restart=always``, ``RestartSec=1``). A whole
cluster can be replaced by a new one on the same store; the launch gate then points at the new
head, so the dispatcher's address never changes. With ``netns`` every worker node runs in its own
network namespace (``bench/netns.py``), so any of them can be cut off instead of killed.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import psutil

from batchinf.job import Job, JobSpec, JobState
from batchinf.jobstore import JobStore
from bench.chaosproxy import LaunchGate, Relay
from bench.faultproxy import FaultProxy
from bench.netns import TestNet
from tests.cluster import LocalCluster, Node, kill_all
from tests.models import GATE_COLOURS, Gate, make_gated_model, make_image_model, write_solid_image

PART = re.compile(r"^part-\d{5,}\.parquet$")
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class RigConfig:
    workers: int = 3  # worker nodes; the head takes no inference work
    worker_cpus: int = 2
    netns: bool = False  # every worker node in its own network namespace
    max_running: int = 2  # the dispatcher's --max-running
    images: int = 64  # distinct small PNGs the manifests repeat
    gated: bool = False  # the model is the gated test model, held by ``Rig.hold`` (closed)
    knobs: dict[str, str] = field(default_factory=dict)  # BATCHINF_* for dispatcher and nodes


@dataclass
class ChaosJob:
    """A submitted job and what the harness knows of it."""

    name: str
    job_id: str
    output: str
    rows: int
    s3: bool
    held: int = 0  # its last rows, held at ``Rig.hold`` until it opens


class Rig:
    """Start with ``with Rig(work, config) as rig``; everything is stopped on the way out."""

    def __init__(self, work: str, config: RigConfig) -> None:
        self.work = work
        self.config = config
        self.store = JobStore.from_uri(os.path.join(work, "store"))
        self.jobs: list[ChaosJob] = []
        self.first_seen: dict[tuple[str, str], float] = {}  # (job_id, part) -> time.time()
        self.net: TestNet | None = None
        self.cluster: LocalCluster | None = None
        self.dispatcher: subprocess.Popen[bytes] | None = None
        self.dispatcher_starts = 0
        self._supervise = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._stack: list[Any] = []  # what close() stops, last first
        self._supervising: threading.Thread | None = None
        self.recovering: Counter[str] = Counter()  # jobs hit by faults not yet recovered from
        self.cluster_lock = threading.RLock()  # one change of the cluster at a time
        self.hold: Gate | None = None  # with ``gated``: holds rows of its picture until opened

    # -- start and stop --------------------------------------------------------------------

    def __enter__(self) -> Rig:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        from moto.server import ThreadedMotoServer

        os.makedirs(self.work, exist_ok=True)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's log of every request
        port = _free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.moto.start()
        self._stack.append(self.moto.stop)
        self.moto_endpoint = f"http://127.0.0.1:{port}"
        self.s3_proxy = FaultProxy(self.moto_endpoint, seed=0)
        self._stack.append(self.s3_proxy.close)
        self.node_s3 = self.s3_proxy.endpoint  # what the nodes' AWS_ENDPOINT_URL points at
        if self.config.netns:
            self.net = TestNet().__enter__()
            self._stack.append(self.net.close)
            relay = Relay(self.net.host_ip, self.s3_proxy.endpoint.removeprefix("http://"))
            self._stack.append(relay.close)
            self.node_s3 = f"http://{relay.address}"
        self.bucket = "chaos"
        self.s3().create_bucket(Bucket=self.bucket)
        self._make_inputs()
        self.start_cluster()
        self.gate = LaunchGate(self.cluster_or_fail().jobs_address)
        self._stack.append(self.gate.close)
        self._supervise.set()
        self._supervising = threading.Thread(target=self._supervisor, daemon=True)
        self._supervising.start()
        threading.Thread(target=self._watch, daemon=True).start()

    def close(self) -> None:
        """Stop everything this rig started, even after a failure halfway."""
        self._closing.set()
        if self.hold is not None:
            self.hold.open()
        self._supervise.clear()
        if self._supervising is not None:  # so that it starts no dispatcher after this
            self._supervising.join(timeout=30)
        self._stop_dispatcher()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        while self._stack:
            try:
                self._stack.pop()()
            except Exception as exc:  # keep stopping the rest
                print(f"chaos: cleanup step failed: {exc}", file=sys.stderr)

    def s3(self) -> Any:
        """A boto3 client straight to moto (the harness's own reads never meet a fault)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.moto_endpoint, **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "region_name": "us-east-1"})

    # -- the cluster -----------------------------------------------------------------------

    def cluster_or_fail(self) -> LocalCluster:
        if self.cluster is None:
            raise RuntimeError("no cluster")
        return self.cluster

    def node_env(self) -> dict[str, str]:
        return {**S3_ENV, "AWS_ENDPOINT_URL": self.node_s3, **self.config.knobs}

    def start_cluster(self) -> None:
        """A head (no CPUs) and the worker nodes, all started at once."""
        node_ip = self.net.host_ip if self.net else ""
        cluster = LocalCluster(env=self.node_env(), node_ip=node_ip)
        self.cluster = cluster
        cluster.start_head(num_cpus=0)
        if not self.net:  # all at once, which saves seconds each
            try:
                cluster.add_nodes(*[(self.config.worker_cpus, None)] * self.config.workers)
            except RuntimeError:  # some timed out on a busy machine: start those again
                _forget_unjoined(cluster)
        while len(self.workers()) < self.config.workers:
            self.add_worker()

    def add_worker(self, tries: int = 3) -> Node:
        """A worker node joined; a ``ray start`` that times out (a busy machine) is tried again."""
        with self.cluster_lock:
            cluster = self.cluster_or_fail()
            for attempt in range(1, tries + 1):
                try:
                    if self.net:
                        name, address = self.net.add()
                        return cluster.add_node_in(name, address, self.config.worker_cpus)
                    return cluster.add_node(self.config.worker_cpus)
                except RuntimeError:
                    _forget_unjoined(cluster)
                    if attempt == tries:
                        raise
            raise AssertionError("unreachable")

    def kill_node(self, node: Node) -> None:
        with self.cluster_lock:
            self.cluster_or_fail().kill(node)

    def workers(self) -> list[Node]:
        return [n for n in self.cluster_or_fail().nodes if not n.head and not n.killed]

    def replace_cluster(self, when_gone: Callable[[], object] = lambda: None) -> None:
        """The whole cluster and the dispatcher lost; a new cluster and dispatcher started.
        ``when_gone`` runs once every old process is dead."""
        with self.cluster_lock:
            self._supervise.clear()
            self._stop_dispatcher(signal.SIGKILL)
            self.cluster_or_fail().shutdown()
            self.cluster = None
            when_gone()
            self.start_cluster()
            self.gate.upstream = self.cluster_or_fail().jobs_address
            self._supervise.set()

    def predictors(self) -> list[dict[str, Any]]:
        """Predictor actors as the state API lists them: name, pid, node_id, state."""
        import json
        import urllib.request

        cluster = self.cluster_or_fail()
        query = urlencode({
            "limit": 10000, "detail": "true", "timeout": 10, "filter_keys": "class_name",
            "filter_predicates": "=", "filter_values": "Predictor"})
        request = urllib.request.Request(f"{cluster.jobs_address}/api/v0/actors?{query}",
                                         headers=cluster.auth_headers)
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                rows = json.load(response).get("data", {}).get("result", {}).get("result", [])
        except (OSError, ValueError):
            return []
        return [{k: row.get(k) for k in ("name", "pid", "node_id", "state")} for row in rows]

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is a process of this rig's cluster (never kill any other)."""
        cluster = self.cluster
        return cluster is not None and any(pid in n.pids for n in cluster.nodes if not n.killed)

    # -- the dispatcher, supervised ----------------------------------------------------------

    def _start_dispatcher(self) -> None:
        cluster = self.cluster_or_fail()
        log = open(os.path.join(self.work, "dispatcher.log"), "ab")  # noqa: SIM115 - the child's
        # Not RAY_ADDRESS: Ray's Jobs client takes it over an explicit address (the gate's).
        env = {k: v for k, v in cluster.client_env().items() if k != "RAY_ADDRESS"}
        env.update({**S3_ENV, **self.config.knobs})
        self.dispatcher = subprocess.Popen(
            [sys.executable, "-m", "batchinf.cli", "dispatcher", "--address",
             self.gate.address, "--store", self.store.root, "--poll", "1",
             "--max-running", str(self.config.max_running)],
            env=env, stdout=log, stderr=log,
        )
        log.close()
        self.dispatcher_starts += 1

    def _stop_dispatcher(self, how: int = signal.SIGTERM) -> None:
        process = self.dispatcher
        if process is None or process.poll() is not None:
            return
        process.send_signal(how)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def kill_dispatcher(self) -> int:
        """SIGKILL the dispatcher (the supervisor starts another); its pid."""
        assert self.dispatcher is not None
        pid = self.dispatcher.pid
        self.dispatcher.kill()
        self.dispatcher.wait(timeout=10)
        return pid

    def _supervisor(self) -> None:
        while not self._closing.is_set():
            if self._supervise.is_set() and (self.dispatcher is None or self.dispatcher.poll() is not None):
                if self.dispatcher is not None:
                    time.sleep(1.0)  # RestartSec=1
                if self._supervise.is_set() and not self._closing.is_set():
                    self._start_dispatcher()
            time.sleep(0.2)

    # -- inputs and jobs --------------------------------------------------------------------

    def _make_inputs(self) -> None:
        """Small solid-colour PNGs on disk and on S3, and the tiny model in both places."""
        folder = os.path.join(self.work, "img")
        s3 = self.s3()
        for i in range(self.config.images):
            path = write_solid_image(os.path.join(folder, f"{i}.png"), ((i * 37) % 256, 90, 30))
            with open(path, "rb") as f:
                s3.put_object(Bucket=self.bucket, Key=f"img/{i}.png", Body=f.read())
        if self.config.gated:  # the same scores; rows of the gate's picture wait for it
            self.hold = Gate(os.path.join(self.work, "hold"), GATE_COLOURS[0])
            with open(self.hold.image, "rb") as f:
                s3.put_object(Bucket=self.bucket, Key="img/hold.png", Body=f.read())
            self.model = make_gated_model(os.path.join(self.work, "model"), (self.hold,))
        else:
            self.model = make_image_model(os.path.join(self.work, "model"))
        for root, _, files in os.walk(self.model):
            for name in files:
                path = os.path.join(root, name)
                key = "model/" + os.path.relpath(path, self.model)
                with open(path, "rb") as f:
                    s3.put_object(Bucket=self.bucket, Key=key, Body=f.read())

    def submit(self, name: str, rows: int, s3: bool, held: int = 0, **options: Any) -> ChaosJob:
        """A job of ``rows`` rows (column ``n`` numbers them) on local files or all on S3; its
        last ``held`` rows are the picture of ``hold`` (a gated rig), which the model holds
        until the gate opens: until then the job cannot end."""
        held_uri = ""
        if held:
            if self.hold is None:
                raise ValueError("held rows need a gated rig (RigConfig.gated)")
            held_uri = f"s3://{self.bucket}/img/hold.png" if s3 else self.hold.image
        lines = ["uri,n"]
        for n in range(rows):
            i = n % self.config.images
            if n >= rows - held:
                where = held_uri
            elif s3:
                where = f"s3://{self.bucket}/img/{i}.png"
            else:
                where = os.path.join(self.work, "img", f"{i}.png")
            lines.append(f"{where},{n}")
        text = "\n".join(lines) + "\n"
        if s3:
            self.s3().put_object(Bucket=self.bucket, Key=f"manifests/{name}.csv", Body=text.encode())
            manifest, model = f"s3://{self.bucket}/manifests/{name}.csv", f"s3://{self.bucket}/model"
            output = f"s3://{self.bucket}/out/{name}"
        else:
            manifest = os.path.join(self.work, "manifests", f"{name}.csv")
            os.makedirs(os.path.dirname(manifest), exist_ok=True)
            with open(manifest, "w", encoding="utf-8") as f:
                f.write(text)
            model, output = self.model, os.path.join(self.work, "out", name)
        job, _ = self.store.create(JobSpec(manifest, model, output, **options))
        chaos_job = ChaosJob(name, job.job_id, output, rows, s3, held)
        with self._lock:
            self.jobs.append(chaos_job)
        return chaos_job

    def hit(self, job_ids: list[str]) -> None:
        with self._lock:
            self.recovering.update(job_ids)

    def recovered(self, job_ids: list[str]) -> None:
        with self._lock:
            self.recovering.subtract(job_ids)

    def is_recovering(self, job_id: str) -> bool:
        with self._lock:
            return self.recovering[job_id] > 0

    def job(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def states(self) -> dict[str, Job]:
        return {j.job_id: self.job(j.job_id) for j in self.jobs}

    def all_ended(self) -> bool:
        return all(j.state.terminal for j in self.states().values())

    # -- committed parts ---------------------------------------------------------------------

    def parts(self, job: ChaosJob) -> list[str]:
        """The part files in the job's output now."""
        if job.s3:
            prefix = job.output.removeprefix(f"s3://{self.bucket}/") + "/"
            pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            names = [o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])]
        else:
            names = os.listdir(job.output) if os.path.isdir(job.output) else []
        return sorted(n for n in names if PART.match(n))

    def read_part(self, job: ChaosJob, part: str) -> Any:
        import pyarrow.parquet as pq

        if job.s3:
            key = job.output.removeprefix(f"s3://{self.bucket}/") + "/" + part
            body = self.s3().get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return pq.read_table(io.BytesIO(body))
        return pq.read_table(os.path.join(job.output, part))

    def snapshot(self, job_ids: list[str]) -> set[tuple[str, str]]:
        """The parts of ``job_ids`` there now (noted as seen), listed right before a fault:
        any other part of theirs was committed after it, whenever the watcher sees it."""
        now = time.time()
        there = {(job.job_id, name) for job in self.jobs if job.job_id in job_ids
                 for name in self.parts(job)}
        with self._lock:
            for key in there:
                self.first_seen.setdefault(key, now)
        return there

    def first_part_after(self, job_ids: list[str], before: set[tuple[str, str]]) -> float | None:
        """When the watcher first saw a part of ``job_ids`` not in ``before``; None if none yet."""
        with self._lock:
            times = [t for key, t in self.first_seen.items() if key[0] in job_ids and key not in before]
        return min(times) if times else None

    def _watch(self) -> None:
        """Note the first time each part file is seen, every half second, until the jobs end."""
        finished: set[str] = set()
        while not self._closing.is_set():
            with self._lock:
                jobs = [j for j in self.jobs if j.job_id not in finished]
            for job in jobs:
                try:
                    ended = self.job(job.job_id).state.terminal  # first: its last part is listed
                    names = self.parts(job)
                except Exception:
                    continue  # a listing that failed is tried again next round
                now = time.time()
                with self._lock:
                    for name in names:
                        self.first_seen.setdefault((job.job_id, name), now)
                if ended:
                    finished.add(job.job_id)
            time.sleep(0.5)


def _forget_unjoined(cluster: LocalCluster) -> None:
    """Nodes not seen to join (a ``ray start`` that failed, or one left unfinished beside it)
    are stopped and count as killed."""
    for node in cluster.nodes:
        if node.node_id or node.killed:
            continue
        if node.startup is not None and node.startup.poll() is None:
            node.startup.kill()
        kill_all(node.processes())
        node.killed = True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running(rig: Rig) -> list[Job]:
    return [j for j in rig.states().values() if j.state is JobState.RUNNING]


def process_is(pid: int, *words: str) -> bool:
    """Whether ``pid`` runs a command line holding every one of ``words``."""
    try:
        args = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False
    return all(w in args for w in words)
