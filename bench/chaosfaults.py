"""The fault kinds of a chaos run: each finds a target mid-job, injects, and says whom it hit.

An injector returns a ``Fault`` (``affected``: the jobs whose next committed part ends its
recovery) or None when nothing is a fit target yet; the run then waits and asks again. A fault
lands mid-job: on a job with some rows done and most still to do, whose replicas are up.

A fault that ends a job's attempt (a driver killed, the whole cluster lost, a node lost) is
only aimed at jobs that have an attempt left after it: after ``MAX_ATTEMPTS`` ended attempts
a job fails by design, and that limit is not what the run measures.

``restore`` puts the cluster back to its size after a fault's recovery was seen (a killed node
without a spare is replaced then, as an autoscaler would later; a cut node's processes are
stopped, as a machine that is rebooted, and a new node joins).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from batchinf.job import MAX_ATTEMPTS, Job
from bench.chaosrig import Rig, process_is, running
from tests.cluster import Node

S3_RATES = {"slowdown": 0.15, "internal": 0.03, "reset": 0.03, "reset_body": 0.02}


@dataclass
class Fault:
    kind: str
    at: float  # time.time() of the injection
    target: str
    affected: list[str]
    note: str = ""
    recovery_s: float | None = None
    restore: Callable[[], object] | None = field(default=None, repr=False)
    before: set[tuple[str, str]] = field(default_factory=set, repr=False)  # parts there already

    @classmethod
    def now(cls, rig: Rig, kind: str, target: str, affected: list[str], **more: Any) -> Fault:
        """A fault about to be injected: the parts its jobs have now, then the time."""
        before = rig.snapshot(affected)
        return cls(kind, time.time(), target, affected, before=before, **more)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "at": self.at, "target": self.target,
                "affected": self.affected, "note": self.note, "recovery_s": self.recovery_s}


def mid_job(rig: Rig, spare_attempt: bool = False) -> list[Job]:
    """Running jobs with rows done, most still to do, replicas up, not recovering from an
    earlier fault; sorted by id (seeded picks).

    ``spare_attempt``: only those that have an attempt left after this one ends.
    """
    fit = []
    for job in running(rig):
        total = job.rows_total or 0
        if not (0 < job.rows_done < 0.8 * total) or job.waiting is not None:
            continue
        if spare_attempt and job.attempt >= MAX_ATTEMPTS or rig.is_recovering(job.job_id):
            continue
        fit.append(job)
    return sorted(fit, key=lambda j: j.job_id)


def replica_kill(rig: Rig, rng: random.Random) -> Fault | None:
    """SIGKILL one replica's process; Ray restarts the actor."""
    jobs = {j.job_id for j in mid_job(rig)}
    actors = sorted((a for a in rig.predictors() if a["state"] == "ALIVE" and a["pid"]
                     and _job_of(a["name"]) in jobs), key=lambda a: a["name"])
    actors = [a for a in actors if rig.owns(a["pid"])]
    if not actors:
        return None
    actor = rng.choice(actors)
    fault = Fault.now(rig, "replica-kill", actor["name"], [_job_of(actor["name"])])
    os.kill(actor["pid"], signal.SIGKILL)
    return fault


def node_kill(rig: Rig, rng: random.Random, spare: bool) -> Fault | None:
    """Kill a worker node that holds a replica; with ``spare``, a new node joins 5 s later."""
    found = _replica_node(rig, rng)
    if found is None:
        return None
    node, affected = found
    fault = Fault.now(rig, "node-kill-spare" if spare else "node-kill", node.node_id[:12], affected)
    rig.kill_node(node)
    if spare:
        time.sleep(5)
        rig.add_worker()
        fault.note = "a spare node joined 5 s later"
    else:
        fault.restore = rig.add_worker  # a node joins back, after the recovery was seen
    return fault


def node_cut(rig: Rig, rng: random.Random) -> Fault | None:
    """Cut a worker node's link (its network namespace's veth down); its processes live on."""
    if rig.net is None:
        raise RuntimeError("node-cut needs the worker nodes in network namespaces (--netns)")
    found = _replica_node(rig, rng)
    if found is None:
        return None
    node, affected = found
    fault = Fault.now(rig, "node-cut", node.node_id[:12], affected)
    rig.net.cut(node.netns)

    def restore() -> None:
        rig.kill_node(node)
        rig.add_worker()

    fault.restore = restore
    return fault


def driver_kill(rig: Rig, rng: random.Random) -> Fault | None:
    """SIGKILL the job's driver, the ``batchinf.cli run`` entrypoint of its Ray job."""
    jobs = [j for j in mid_job(rig, spare_attempt=True) if j.runner and j.runner.get("pid")]
    if not jobs:
        return None
    job = rng.choice(jobs)
    pid = int(job.runner["pid"])  # type: ignore[index]
    if not (rig.owns(pid) and process_is(pid, "batchinf.cli", "run", job.job_id)):
        return None
    fault = Fault.now(rig, "driver-kill", f"{job.job_id} pid {pid}", [job.job_id])
    os.kill(pid, signal.SIGKILL)
    return fault


def dispatcher_kill(rig: Rig, rng: random.Random) -> Fault | None:
    """SIGKILL the dispatcher; the supervisor starts a new one a second later."""
    jobs = mid_job(rig)
    if not jobs:
        return None
    assert rig.dispatcher is not None
    fault = Fault.now(rig, "dispatcher-kill", f"pid {rig.dispatcher.pid}",
                      [j.job_id for j in running(rig)])
    rig.kill_dispatcher()
    return fault


def cluster_kill(rig: Rig, rng: random.Random) -> Fault | None:
    """Kill the head, every worker node and the dispatcher; start a new cluster and dispatcher."""
    jobs = running(rig)
    if not mid_job(rig) or any(j.attempt >= MAX_ATTEMPTS for j in jobs):
        return None
    fault = Fault.now(rig, "cluster-kill", "head + workers + dispatcher", [j.job_id for j in jobs])

    def gone() -> None:  # a part a driver committed while the cluster was being killed is none
        fault.before = rig.snapshot(fault.affected)  # that the new cluster made

    rig.replace_cluster(gone)
    fault.note = f"new cluster up after {time.time() - fault.at:.0f} s"
    return fault


def launch_refused(rig: Rig, rng: random.Random, window_s: float = 0.0,
                   wait_s: float = 90.0) -> Fault | None:
    """Refuse launches at the Jobs API for ``window_s`` from the next launch on.

    The window opens at the next ``POST /api/jobs/``, so it always refuses at least one launch;
    the fault's time is that first refusal, its job the one whose launch was refused.
    """
    if not any(j.state.value == "QUEUED" for j in rig.states().values()):
        return None
    window = window_s or rng.uniform(6.0, 12.0)
    proxy = rig.gate
    seen = len(proxy.refused)
    proxy.arm(window)
    deadline = time.monotonic() + wait_s
    while len(proxy.refused) == seen and time.monotonic() < deadline and not rig.all_ended():
        time.sleep(0.2)
    proxy.arm(0.0)
    if len(proxy.refused) == seen:
        return None
    at, submission = proxy.refused[seen]
    job_id = submission.rsplit("-a", 1)[0]
    fault = Fault.now(rig, "launch-refused", submission, [job_id], note=f"window {window:.1f} s")
    fault.at = at  # the first refusal; the job had no part since, being queued
    return fault


def s3_faults(rig: Rig, rng: random.Random, window_s: float = 0.0) -> Fault | None:
    """503 SlowDown, 500s and resets on a share of S3 requests for a window of seconds."""
    s3_ids = {j.job_id for j in rig.jobs if j.s3}
    jobs = [j for j in mid_job(rig) if j.job_id in s3_ids]
    if not jobs:
        return None
    window = window_s or rng.uniform(8.0, 15.0)
    before = dict(rig.s3_proxy.counts)
    fault = Fault.now(rig, "s3-faults", f"{window:.0f} s window", [j.job_id for j in jobs])
    rig.s3_proxy.rates = dict(S3_RATES)

    def close_window() -> None:
        time.sleep(window)
        rig.s3_proxy.rates = {}
        hit = {k: v - before.get(k, 0) for k, v in rig.s3_proxy.counts.items() if k != "requests"}
        fault.note = f"window {window:.1f} s, injected {dict(sorted(hit.items()))}"

    threading.Thread(target=close_window, daemon=True).start()
    return fault


KINDS: dict[str, Callable[[Rig, random.Random], Fault | None]] = {
    "replica-kill": replica_kill,
    "node-kill-spare": lambda rig, rng: node_kill(rig, rng, spare=True),
    "node-kill": lambda rig, rng: node_kill(rig, rng, spare=False),
    "node-cut": node_cut,
    "driver-kill": driver_kill,
    "dispatcher-kill": dispatcher_kill,
    "cluster-kill": cluster_kill,
    "launch-refused": launch_refused,
    "s3-faults": s3_faults,
}
CHEAP = ("replica-kill", "driver-kill", "dispatcher-kill", "launch-refused", "s3-faults")


def _job_of(actor_name: str | None) -> str:
    """``bi-20261121-213000-3f9a1c-<tag>-predictor-0`` -> the job id (its first four fields)."""
    return "-".join((actor_name or "").split("-")[:4])


def _replica_node(rig: Rig, rng: random.Random) -> tuple[Node, list[str]] | None:
    """A worker node holding a replica of a mid-job job, and the jobs with replicas on it."""
    jobs = {j.job_id for j in mid_job(rig, spare_attempt=True)}
    others = {j.job_id for j in running(rig)} - jobs
    actors = [a for a in rig.predictors() if a["state"] == "ALIVE"]
    on_node: dict[str, set[str]] = {}
    for actor in actors:
        on_node.setdefault(actor["node_id"], set()).add(_job_of(actor["name"]))
    nodes = [n for n in rig.workers() if on_node.get(n.node_id, set()) & jobs
             and not on_node.get(n.node_id, set()) & others]
    if not nodes:
        return None
    node = rng.choice(sorted(nodes, key=lambda n: n.node_id))
    return node, sorted(on_node[node.node_id])
