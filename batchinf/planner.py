"""The resource plan: what each replica and decode task reserves, and where it can go.

Planned per node, never per cluster total: a demand is only worth making if it fits whole on
one node. The planner is pure (node resource dicts and ``Settings`` in, a ``Plan`` out: it reads
no environment), so any cluster shape can be tested without a cluster::

    nodes (live: total and free resources)  ──►  sizes: CPUs per replica, CPUs per decode task
    spec (replicas, CPUs, GPUs, resources)       how many replicas fit in what is free now
    node types the autoscaler can add            why the rest waits, or why it never can

Rules, in order:
1. A replica needs its GPUs and custom resources (``--replica-resources``) whole on one node.
   If no live node and no autoscaler node type has them, the job fails at once (``Infeasible``).
2. Decode always keeps CPUs: what was asked (``--decode-cpus``; by default half a CPU beside
   CPU replicas, ``DECODE_CPUS_PER_GPU`` per GPU), or at least half the roomiest node's CPUs.
   Replicas reserve up to ``--cpus-per-replica`` (by default: all a node has left beside
   decode, shared by the replicas on it; one CPU for a GPU replica) and shrink (never below
   ``MIN_SHARE``) until the replicas and decode fit side by side on the nodes. TensorFlow gets
   one thread per reserved CPU, so a replica that reserves the node uses the node; a CPU
   replica splits each batch into up to four parts run at once (``model_streams``).
3. Replicas spread: each goes to the fitting node with the most free CPU.
4. Decode goes where CPUs are left, nodes without the replicas' special resources (GPU nodes)
   first; if those nodes can take all of it, decode is kept off the GPU nodes.
5. The sizes come from what is free to this job now; if not even ``replicas_min`` fit beside
   the jobs already running, the plan says so (``replicas_now == 0``) and the job waits.
6. A running job that lost nodes is planned again (``replan``) on what is alive: its replicas
   keep their size (and so their TensorFlow threads), as many as fit go on, one at least, and
   decode takes what is left; the rest wait for room, as ``MIN:MAX`` replicas do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from batchinf.errors import JobFailed
from batchinf.job import JobSpec
from batchinf.settings import DEFAULTS, Settings

DECODE_CPUS_PER_GPU = 4.0  # docs/performance.md: a GPU replica outruns one CPU of decode ~10x
DECODE_CPUS_BESIDE_CPU_REPLICAS = 0.5  # a CPU model spends ~10x decode's CPU per image
MAX_MODEL_STREAMS = 4  # parts of a batch run at once in a CPU replica (``model_streams``)
MIN_SHARE = 0.1  # below this a reservation stops meaning anything
_EPS = 1e-9


class Infeasible(JobFailed):
    """No node that exists, and no node the autoscaler can add, can ever hold this demand."""


@dataclass(frozen=True)
class NodeView:
    """One node as the planner sees it: its total resources and what is free on it now."""

    node_id: str
    total: dict[str, float]
    free: dict[str, float]

    def cpus(self, free: bool = True) -> float:
        return float((self.free if free else self.total).get("CPU", 0.0))


@dataclass(frozen=True)
class Plan:
    """How a job uses the cluster: sizes, counts, where decode should not go, what waits."""

    replica: dict[str, float]  # what one replica reserves, e.g. {"CPU": 1.0, "GPU": 1.0}
    decode_cpus: float  # what one decode task reserves
    decode_tasks: int  # decode tasks kept running at once
    replicas_now: int  # replicas that fit in what is free now (0: the job must wait)
    replicas_max: int
    tf_threads: int  # TensorFlow threads per replica: the CPUs it reserved
    fetch_threads: int
    decode_nice: int
    avoid_nodes: tuple[str, ...] = ()  # decode stays off these (they hold the GPU replicas)
    waiting: str | None = None  # why not every replica fits now
    placement: dict[str, list[str]] = field(default_factory=dict)  # node -> ["replica", "decode"]
    model_streams: int = 1  # parts each batch is split into, run at once (``model_streams``)
    replica_memory: float = 0.0  # bytes of Ray's memory resource one replica reserves (0: none)

    @property
    def max_in_flight(self) -> int:
        """Two batches per replica (one running, one ready) and one per decode task."""
        return 2 * self.replicas_max + self.decode_tasks + 1

    @property
    def replica_cpus(self) -> float:
        return self.replica.get("CPU", 0.0)

    @property
    def replica_gpus(self) -> float:
        return self.replica.get("GPU", 0.0)

    @property
    def reserved(self) -> dict[str, float]:
        """What one replica reserves, its memory included."""
        return self.replica | ({"memory": self.replica_memory} if self.replica_memory else {})

    def bundles(self) -> list[dict[str, float]]:
        """The reservation: one bundle per replica that fits now, one per decode task."""
        replica = {k: v for k, v in self.reserved.items() if v > 0}
        return [dict(replica) for _ in range(self.replicas_now)] + [
            {"CPU": self.decode_cpus} for _ in range(self.decode_tasks)
        ]

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["max_in_flight"] = self.max_in_flight
        data["avoid_nodes"] = list(self.avoid_nodes)
        return data


def model_streams(threads: int, gpu: bool = False, given: int | None = None) -> int:
    """Into how many parts a CPU replica splits each batch, run at once on its ``threads``.

    One call spread over every core waits at each layer for its slowest thread, so a core
    taken for a moment by anything else (decode, the driver, Ray) stalls the whole call; on
    two cores that cost the model about a sixth of its speed beside decode. Parts of one
    thread each run layer after layer without waiting for each other (docs/performance.md).
    The parts together are one batch, so memory does not grow. At most
    ``MAX_MODEL_STREAMS``, with the threads shared out among them on bigger nodes; a GPU
    replica runs each batch whole. ``given`` (the ``model_streams`` setting) overrides.
    """
    if given is not None:
        return max(1, given)
    return 1 if gpu else max(1, min(threads, MAX_MODEL_STREAMS))


def special_needs(spec: JobSpec) -> dict[str, float]:
    """What a replica needs besides CPU: its GPUs and custom resources."""
    needs = dict(spec.replica_resources)
    if spec.gpus_per_replica > 0:
        needs["GPU"] = spec.gpus_per_replica
    return needs


def plan(
    nodes: Sequence[NodeView],
    spec: JobSpec,
    node_types: Sequence[dict[str, float]] = (),
    settings: Settings = DEFAULTS,
    memory: float = 0.0,
) -> Plan:
    """Plan ``spec`` on ``nodes`` (live) given what is free now; see the module docstring.
    ``memory``: the bytes one replica holds (``model.replica_memory``), reserved as Ray's
    ``memory`` resource on its node."""
    needs = special_needs(spec) | ({"memory": memory} if memory > 0 else {})
    wanted_decode = _wanted_decode(spec)
    _check_feasible(nodes, needs, node_types)
    for count in (spec.replicas_max, spec.replicas_min):  # all of them, else at least MIN
        found = _fit(nodes, spec, needs, count, wanted_decode, free=True)
        if found is not None:
            return _finish(found, spec, count, settings)
    # Nothing fits in what is free: size against the nodes' totals, or with nodes the
    # autoscaler can add, and wait for room; if neither can ever hold it, fail now.
    found = _fit(nodes, spec, needs, spec.replicas_min, wanted_decode, free=False)
    reason = "waiting for resources held by other jobs"
    if found is None:
        grown = list(nodes) + _virtual(node_types, copies=spec.replicas_min + 1)
        found = _fit(grown, spec, needs, spec.replicas_min, wanted_decode, free=False)
        reason = "waiting for the autoscaler to add a node"
    if found is None:
        raise Infeasible(
            f"{spec.replicas_min} replica(s) needing {describe(dict(needs, CPU=MIN_SHARE))} or "
            f"more each, with decode CPUs beside them, do not fit on the cluster's nodes "
            f"({', '.join(_offered(nodes, node_types))}); ask for fewer replicas or CPUs"
        )
    result = _finish(found, spec, 0, settings)
    demand = describe(result.replica)
    return dataclasses.replace(
        result, waiting=f"{reason}: {spec.replicas_min} replica(s) need {demand} each, "
        f"with {result.decode_cpus * result.decode_tasks:g} CPU of decode beside them",
    )


def replan(
    nodes: Sequence[NodeView],
    spec: JobSpec,
    replica: dict[str, float],
    node_types: Sequence[dict[str, float]] = (),
    *,
    resize: bool = True,
    settings: Settings = DEFAULTS,
) -> Plan | None:
    """Plan a running job again on ``nodes`` (what is alive and free) after it lost some.

    Replicas keep the size ``replica`` they had, so a survivor's share of a node does not
    shrink to make room for replicas that add nothing on the same cores: as many as fit go on
    (``replicas_max`` down to one), the others wait for room as ``MIN:MAX`` replicas do. Only
    when not even one fits at that size is the job planned afresh with ``replicas_min`` 1;
    ``node_types`` should then include the shapes of the lost nodes, which may come back.
    Without ``resize`` that case is None instead: the caller may still see its own stopped
    replicas' room as taken, and should ask again once that view has settled.
    """
    wanted_decode = _wanted_decode(spec)
    roomiest = max((n.cpus() for n in nodes), default=0.0)
    floor = min(wanted_decode, roomiest / 2)
    if floor >= MIN_SHARE:
        for count in range(spec.replicas_max, 0, -1):
            found = _pack(nodes, dict(replica), count, wanted_decode, floor, free=True)
            if found is not None:
                return _finish(found, spec, count, settings)
    if not resize:
        return None
    return plan(nodes, dataclasses.replace(spec, replicas_min=1), node_types, settings,
                replica.get("memory", 0.0))


def _wanted_decode(spec: JobSpec) -> float:
    """Decode CPUs the job asks for, or the default beside its kind of replica."""
    return spec.decode_cpus or (
        DECODE_CPUS_PER_GPU * spec.gpus_per_replica * spec.replicas_max
        if spec.gpus_per_replica else DECODE_CPUS_BESIDE_CPU_REPLICAS
    )


@dataclass(frozen=True)
class _Fit:
    replica: dict[str, float]
    decode_cpus: float
    decode_tasks: int
    placement: dict[str, list[str]]
    avoid: tuple[str, ...]


def _finish(found: _Fit, spec: JobSpec, count: int, settings: Settings) -> Plan:
    cpus = found.replica.get("CPU", 0.0)
    replica = {k: v for k, v in found.replica.items() if k != "memory"}
    waiting = None
    if 0 < count < spec.replicas_max:
        waiting = (
            f"waiting for {spec.replicas_max - count} of {spec.replicas_max} replicas: "
            f"needs {describe(replica)}"
        )
    tf_threads = settings.tf_threads
    if tf_threads is None:  # one thread per reserved CPU (half a CPU still gets one)
        tf_threads = max(1, math.ceil(cpus - _EPS))
    gpu = found.replica.get("GPU", 0.0) > 0
    return Plan(
        replica=replica,
        replica_memory=found.replica.get("memory", 0.0),
        decode_cpus=found.decode_cpus,
        decode_tasks=found.decode_tasks,
        replicas_now=count,
        replicas_max=spec.replicas_max,
        tf_threads=tf_threads,
        model_streams=model_streams(tf_threads, gpu, settings.model_streams),
        fetch_threads=settings.fetch_threads,
        decode_nice=settings.decode_nice,
        avoid_nodes=found.avoid,
        waiting=waiting,
        placement=found.placement,
    )


def _check_feasible(
    nodes: Sequence[NodeView], needs: dict[str, float], node_types: Sequence[dict[str, float]]
) -> None:
    """Fail now if no node, live or addable, can ever hold one replica or one decode task."""
    shapes = [n.total for n in nodes] + list(node_types)
    offered = _offered(nodes, node_types)
    if not any(_has(shape, needs) and shape.get("CPU", 0) >= MIN_SHARE for shape in shapes):
        raise Infeasible(
            f"no node can ever hold a replica: it needs {describe(dict(needs, CPU=MIN_SHARE))} "
            f"on one node; the cluster's nodes and node types offer {', '.join(offered)}"
        )
    if not any(shape.get("CPU", 0) >= MIN_SHARE for shape in shapes):
        raise Infeasible(f"no node has CPUs for decoding; nodes offer {', '.join(offered)}")


def _fit(
    nodes: Sequence[NodeView],
    spec: JobSpec,
    needs: dict[str, float],
    count: int,
    wanted_decode: float,
    *,
    free: bool,
) -> _Fit | None:
    """The largest replica CPU size at which ``count`` replicas and enough decode fit."""
    if not nodes:
        return None
    roomiest = max(n.cpus(free) for n in nodes)
    floor = min(wanted_decode, roomiest / 2)
    if floor < MIN_SHARE:
        return None
    for cpus in _candidate_sizes(nodes, asked_cpus(spec), count, floor, free, wanted_decode):
        found = _pack(nodes, dict(needs, CPU=cpus), count, wanted_decode, floor, free)
        if found is not None:
            return found
    return None


def asked_cpus(spec: JobSpec) -> float:
    """The most CPUs a replica may reserve: the option, else one for GPU replicas, else all."""
    if spec.cpus_per_replica is not None:
        return spec.cpus_per_replica
    return 1.0 if spec.gpus_per_replica else math.inf


def _candidate_sizes(
    nodes: Sequence[NodeView], asked: float, count: int, floor: float, free: bool,
    wanted: float = 0.0,
) -> list[float]:
    """Replica CPU sizes to try, largest first: what was asked, then what ``m`` replicas on
    one node leave beside a decode share (``(cpus - share) / m``)."""
    if asked <= 0:
        return [0.0]
    sizes = {asked} if math.isfinite(asked) else set()
    for node in nodes:
        for m in range(1, count + 1):
            for share in (0.0, floor, 0.5, 1.0, wanted):
                sizes.add((node.cpus(free) - share) / m)
    ok = {math.floor(1000 * min(s, asked)) / 1000 for s in sizes if s > 0}
    return sorted((s for s in ok if s >= MIN_SHARE or s == asked), reverse=True)


def _pack(
    nodes: Sequence[NodeView],
    replica: dict[str, float],
    count: int,
    wanted_decode: float,
    floor: float,
    free: bool,
) -> _Fit | None:
    room = {n.node_id: dict(n.free if free else n.total) for n in nodes}
    placement: dict[str, list[str]] = {n.node_id: [] for n in nodes}
    for _ in range(count):
        fitting = [n for n in nodes if _has(room[n.node_id], replica)]
        if not fitting:
            return None
        best = max(fitting, key=lambda n: room[n.node_id].get("CPU", 0.0))
        _take(room[best.node_id], replica)
        placement[best.node_id].append("replica")
    special = {k for k in replica if k not in ("CPU", "memory")}  # GPUs, custom: a node type
    plain = [n for n in nodes if not any(n.total.get(k, 0) > 0 for k in special)]
    ordered = plain + [n for n in nodes if n not in plain]
    left = max((room[n.node_id].get("CPU", 0.0) for n in nodes), default=0.0)
    size = min(1.0, wanted_decode, left)
    if size < min(floor, MIN_SHARE) or size <= 0:
        return None
    tasks, want = 0, max(1, math.floor(wanted_decode / size + _EPS))
    used_plain = 0
    for node in ordered:
        while tasks < want and room[node.node_id].get("CPU", 0.0) >= size - _EPS:
            _take(room[node.node_id], {"CPU": size})
            placement[node.node_id].append("decode")
            tasks += 1
            used_plain += node in plain
    if tasks * size < floor - _EPS:
        return None
    avoid: tuple[str, ...] = ()
    if special and plain and used_plain == tasks:
        avoid = tuple(n.node_id for n in nodes if n not in plain)
    placement = {k: v for k, v in placement.items() if v}
    return _Fit(replica, round(size, 4), tasks, placement, avoid)


def _virtual(node_types: Sequence[dict[str, float]], copies: int) -> list[NodeView]:
    return [
        NodeView(f"node-type-{i}-{c}", dict(t), dict(t))
        for i, t in enumerate(node_types)
        for c in range(copies)
    ]


def _offered(nodes: Sequence[NodeView], node_types: Sequence[dict[str, float]]) -> list[str]:
    shapes = [n.total for n in nodes] + list(node_types)
    return sorted({describe(s) for s in shapes}) or ["no nodes"]


def _has(room: dict[str, float], demand: dict[str, float]) -> bool:
    """Whether ``room`` holds ``demand``; memory only where the node says how much it has
    (Ray's nodes always do; a node type in an autoscaler config often does not)."""
    return all(room.get(k, 0.0) >= v - _EPS for k, v in demand.items()
               if v > 0 and (k != "memory" or k in room))


def _take(room: dict[str, float], demand: dict[str, float]) -> None:
    for key, value in demand.items():
        if key != "memory" or key in room:  # (memory: as ``_has`` counts it)
            room[key] = room.get(key, 0.0) - value


def describe(resources: dict[str, float]) -> str:
    """A resource demand as users read it: ``{'CPU': 1.0, 'GPU': 1.0}``, zeros left out."""
    shown: dict[str, float | str] = {
        k: f"{v / 2**30:.1f} GiB" if k == "memory" else round(float(v), 3)
        for k, v in sorted(resources.items()) if v > 0}
    return str(shown)
