"""The replica pool: predictor actors that each hold the model, on a reservation of their own.

A job reserves what it plans (``batchinf.planner``) as one Ray placement group: a bundle per
replica and a bundle per decode task. The group is placed whole or not at all, so two jobs can
never each hold half of what they need and wait on each other forever: the second one waits,
saying why, until the first frees the room. Replicas beyond what fits now (``MIN:MAX``) are
started as plain actors; they stay pending (demand the autoscaler sees) and join when they
start.

Replicas come and go while a job runs. A replica whose process dies is restarted by Ray in
its bundle. A lost node takes its bundles with it: when what is left can hold them, Ray places
them again and the replicas and decode tasks that were there restart in them. When it cannot,
nothing may wait for them (a task or replica bound to a bundle that cannot come back waits
forever), so the reservation is replaced (``_watch``)::

    reservation not placed whole for ``replan_after`` s ──► every replica stopped, group removed
        ──► ``replan`` on what is alive (replicas keep their size; fewer of them, fewer decode
            CPUs) ──► a new group ──► replicas launched in it (the rest wait for room, and
            join when a node does, up to MAX) ──► the driver decodes again what was lost

Survivors are stopped too, since a replica cannot leave its group: the price is one model
load, seconds. While no replica is ready the job says why (``waiting_reason``); only when none
has been alive for ``replica_loss_timeout`` seconds does the attempt end
(``InfrastructureError``, which the dispatcher retries). Those times, and the node types an
autoscaler may add, are the job's settings (``batchinf.settings``), handed to the pool.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchinf import metrics
from batchinf.errors import InfrastructureError, JobFailed, ModelError
from batchinf.job import JobSpec
from batchinf.model import ModelSource
from batchinf.planner import NodeView, Plan, describe, plan, replan
from batchinf.predictor import ChampionChallenger, Predictor
from batchinf.raycluster import free_resources_per_node, root_cause
from batchinf.settings import DEFAULTS, Settings

log = logging.getLogger("batchinf.pool")

PLACEMENT_WAIT_S = 10.0  # a reservation not placed by then is re-planned from what is free
WATCH_EVERY_S = 1.0  # how often the reservation's state is read while the job runs
SETTLE_S = 5.0  # until then a re-plan keeps the replicas' size: stopped ones' room may show late
BUSY_EVERY_S = 5.0  # how often each replica's busy share is exported while the job runs
REPLICA_RESTARTS = 8
NODE_ID_LABEL = "ray.io/node-id"


def live_nodes() -> list[NodeView]:
    """The cluster's live nodes with their total and currently free resources."""
    import ray
    free = free_resources_per_node()
    return [
        NodeView(node["NodeID"], dict(node["Resources"]), dict(free.get(node["NodeID"], {})))
        for node in ray.nodes()
        if node.get("Alive")
    ]


def autoscaler_node_types(settings: Settings = DEFAULTS) -> list[dict[str, float]]:
    """Resources of the worker node types the autoscaler may add (none if it cannot add any).

    From the ``node_types`` setting (a JSON list of resource dicts), else from the autoscaling
    config that ``ray up`` leaves on the head (``~/ray_bootstrap_config.yaml``).
    """
    given = settings.node_type_list
    if given is not None:
        return given
    path = os.path.expanduser("~/ray_bootstrap_config.yaml")
    if not os.path.exists(path):
        return []
    import yaml

    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    types = config.get("available_node_types") or {}
    return [
        {k: float(v) for k, v in (t.get("resources") or {}).items()}
        for t in types.values()
        if int(t.get("max_workers", 0)) > 0
    ]


@dataclass
class _Replan:
    """A reservation being replaced: since when, and the new one while it is being placed."""

    since: float
    nodes: list[NodeView] | None  # what is alive once the old group is gone (first try only)
    group: Any = None
    plan: Plan | None = None
    asked_at: float = 0.0
    waiting: str | None = None  # why no new reservation fits yet


class PredictorPool:
    """Predictor actors, picked least-busy first; replicas that start late or restart rejoin."""

    def __init__(
        self,
        source: ModelSource,
        spec: JobSpec,
        name_prefix: str,
        on_wait: Callable[[str | None], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        *,
        settings: Settings,
        challenger: ModelSource | None = None,
        memory: float = 0.0,
    ) -> None:
        """``challenger``: a second model each replica holds beside ``source``. ``memory``:
        the bytes a replica holds (``model.replica_memory``), reserved on its node."""
        self._source = source
        self._challenger = challenger
        self._memory = memory
        self._spec = spec
        self._settings = settings
        self._prefix = f"{name_prefix}-{secrets.token_hex(2)}"
        self._on_wait = on_wait or (lambda reason: None)
        self._should_stop = should_stop or (lambda: False)
        self._group: Any = None
        self.plan: Plan | None = None
        self._actors: list[Any] = []
        self._starting: dict[Any, Any] = {}  # ready() ref -> actor not yet (or no longer) ready
        self._busy: dict[Any, int] = {}  # ready actor -> batches sent and not yet back
        self._lost: dict[Any, float] = {}  # lost actor -> when to ask again if it is back
        self._ever_ready: set[Any] = set()
        self._none_ready_since: float | None = None
        self._launched_at = 0.0
        self._began = False
        self._need = spec.replicas_min  # ready replicas before model work begins
        self._names: dict[Any, str] = {}  # actor -> its replica number, for metrics
        self._shapes: list[dict[str, float]] = []  # nodes seen: a lost one's type may come back
        self._replan: _Replan | None = None
        self._recovering = False  # replaced reservation: until its replicas hold the model
        self._unplaced_since: float | None = None
        self._next_watch = 0.0
        self._busy_asked: dict[Any, str] = {}  # busy_seconds() ref -> replica number
        self._next_busy = 0.0
        self.generation = 0  # reservations replaced so far: decode work of older ones is lost

    @property
    def max_in_flight(self) -> int:
        assert self.plan is not None
        return max(self.plan.max_in_flight, 2 * len(self._busy) + 1)

    def reserve(self) -> Plan | None:
        """Plan from the live nodes and reserve it; waits (saying why) while nothing fits.

        Raises ``Infeasible`` at once for a demand no node can ever meet. Returns None if the
        job was cancelled while waiting.
        """
        from ray.util.placement_group import remove_placement_group

        node_types = autoscaler_node_types(self._settings)
        while not self._should_stop():
            nodes = live_nodes()
            self._shapes = [n.total for n in nodes]
            current = plan(nodes, self._spec, node_types, self._settings, self._memory)
            if current.replicas_now == 0:
                self._on_wait(current.waiting)
                time.sleep(2.0)
                continue
            group = _ask(current)
            if _placed(group, PLACEMENT_WAIT_S):
                self._group, self.plan = group, current
                self._on_wait(current.waiting)
                return current
            remove_placement_group(group)  # another job took the room meanwhile: plan again
            self._on_wait(f"waiting for resources held by other jobs: {current.bundles()}")
        return None

    def launch(self) -> None:
        """Start the replicas, without waiting: each loads the model while the job fetches and
        decodes its first batches. ``check_started`` bounds how long they may take."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        assert self.plan is not None
        remote: Any = ray.remote(ChampionChallenger if self._challenger else Predictor)
        models = (self._source, self._challenger) if self._challenger else (self._source,)
        custom = {k: v for k, v in self.plan.replica.items() if k not in ("CPU", "GPU")}
        generation = f"-{self.generation}" if self.generation else ""
        for number in range(self._spec.replicas_max):
            strategy: Any = "SPREAD"
            if number < self.plan.replicas_now:
                strategy = PlacementGroupSchedulingStrategy(
                    self._group, placement_group_bundle_index=number
                )
            actor: Any = remote.options(
                name=f"{self._prefix}{generation}-predictor-{number}",
                num_cpus=self.plan.replica_cpus,
                num_gpus=self.plan.replica_gpus,
                resources=custom or None,
                memory=self.plan.replica_memory or None,
                max_restarts=REPLICA_RESTARTS,
                max_task_retries=0,  # a lost call is resent by the driver, to a live replica
                scheduling_strategy=strategy,
            ).remote(*models, self._spec.top_k, self.plan.tf_threads, True,
                     self.plan.model_streams, tuple(self._spec.outputs))
            self._actors.append(actor)
            self._names[actor] = str(number)
            self._starting[actor.ready.remote()] = actor
        self._launched_at = time.monotonic()

    @property
    def started(self) -> bool:
        """Whether ``replicas_min`` replicas have held the model: model work may begin (and
        goes on with fewer, should some be lost later)."""
        return self._began

    def check_started(self) -> None:
        """``JobFailed`` when ``replicas_min`` replicas do not hold the model within
        ``replica_start_timeout`` seconds of ``launch``."""
        limit = self._settings.replica_start_timeout
        if self.started or time.monotonic() - self._launched_at <= limit:
            return
        raise JobFailed(
            f"only {len(self._busy)} of {self._spec.replicas_min} replicas started within "
            f"{limit:.0f}s"
        )

    @property
    def replanning(self) -> bool:
        """Whether the reservation is being replaced: no decode task may start until it is."""
        return self._replan is not None

    def decode_options(self) -> dict[str, Any]:
        """Ray options for a decode task: it runs in one of this job's decode bundles."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        assert self.plan is not None and self._group is not None
        return {
            "num_cpus": self.plan.decode_cpus,
            "max_retries": 3,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self._group, placement_group_bundle_index=-1
            ),
        }

    def refresh(self, timeout: float = 0.0) -> None:
        """Let replicas that have loaded the model (or come back) take work."""
        import ray

        self._watch()
        if self._replan is not None and not self._starting:
            time.sleep(min(timeout, WATCH_EVERY_S))  # nothing to wait on but the cluster
        now = time.monotonic()
        for actor, when in list(self._lost.items()):
            if when <= now:  # ask a lost replica again whether Ray has restarted it
                del self._lost[actor]
                self._starting[actor.ready.remote()] = actor
        if self._starting:
            refs = list(self._starting)  # with a timeout, return as soon as one is ready
            ready, _ = ray.wait(refs, num_returns=1 if timeout else len(refs), timeout=timeout)
            for ref in ready:
                actor = self._starting.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    if getattr(exc, "actor_init_failed", False) and actor not in self._ever_ready:
                        raise ModelError(f"a model replica failed to start: {root_cause(exc)}") from exc
                    self._lost[actor] = time.monotonic() + 2.0  # restarting, or gone for good
                    continue
                except ray.exceptions.RayError as exc:
                    raise ModelError(f"a model replica failed to start: {root_cause(exc)}") from exc
                self._busy[actor] = 0
                self._ever_ready.add(actor)
        self._began = self._began or len(self._busy) >= self._need
        self._recovering = self._recovering and len(self._busy) < self._need
        self._check_some_alive()

    def _watch(self) -> None:
        """Replace the reservation once a lost node left it unplaced for ``replan_after`` s.

        Ray places a lost bundle again within a second where there is room; a group still
        not placed after that waits for a node that may never come, and so would every
        replica and decode task bound to it.
        """
        now = time.monotonic()
        if now < self._next_watch:
            return
        self._next_watch = now + WATCH_EVERY_S
        if self._replan is not None:
            self._step_replan()
            return
        if self._group is None or _state(self._group) == "CREATED":
            self._unplaced_since = None
            return
        self._unplaced_since = self._unplaced_since or now
        if now - self._unplaced_since >= self._settings.replan_after:
            self._begin_replan()

    def _begin_replan(self) -> None:
        """Stop every replica and remove the group; what its live bundles held is free again."""
        from ray.util.placement_group import remove_placement_group

        log.warning("reservation not placed whole for %.0f s after a lost node: replacing it",
                    self._settings.replan_after)
        nodes = _nodes_without(self._group)
        self._kill_replicas()
        remove_placement_group(self._group)
        self._group, self._unplaced_since = None, None
        self._replan = _Replan(since=time.monotonic(), nodes=nodes)
        self.generation += 1
        self._on_wait(self.waiting_reason())
        self._step_replan()

    def _step_replan(self) -> None:
        """Plan on what is alive and ask for it; launch the replicas once it is placed."""
        from ray.util.placement_group import remove_placement_group

        assert self._replan is not None and self.plan is not None
        pending, now = self._replan, time.monotonic()
        if pending.group is None:
            nodes, pending.nodes = pending.nodes or live_nodes(), None
            node_types = autoscaler_node_types(self._settings) + self._shapes
            current = replan(nodes, self._spec, self.plan.reserved, node_types,
                             resize=now - pending.since > SETTLE_S, settings=self._settings)
            if current is None:
                pending.waiting = f"waiting for room for a replica of {describe(self.plan.replica)}"
                return
            if current.replicas_now == 0:
                pending.waiting = current.waiting
                return
            log.info("re-planned on what is alive: %d replica(s) of %s, %d decode task(s) of "
                     "%g CPU", current.replicas_now, describe(current.replica),
                     current.decode_tasks, current.decode_cpus)
            pending.group, pending.plan, pending.asked_at = _ask(current), current, now
        if _state(pending.group) == "CREATED":
            assert pending.plan is not None
            self._group, self.plan, self._replan = pending.group, pending.plan, None
            self._need = min(self._spec.replicas_min, pending.plan.replicas_now)
            self._recovering = True
            log.info("new reservation placed after %.1f s: launching replicas",
                     now - pending.since)
            self.launch()
        elif now - pending.asked_at > PLACEMENT_WAIT_S:  # taken meanwhile: plan again
            remove_placement_group(pending.group)
            pending.group = None
            pending.waiting = "waiting for resources held by other jobs"

    def _check_some_alive(self) -> None:
        if self._busy or not self._ever_ready:  # before the first: ``check_started``'s bound
            self._none_ready_since = None
            return
        now = time.monotonic()
        self._none_ready_since = self._none_ready_since or now
        limit = self._settings.replica_loss_timeout
        if now - self._none_ready_since > limit:
            raise InfrastructureError(
                f"no model replica has been alive for {limit:.0f}s "
                "(their nodes were lost and nothing has room to restart them)"
            )

    def waiting_reason(self) -> str | None:
        """What replicas wait for, while some are not ready (None when all are)."""
        missing = self._spec.replicas_max - len(self._busy)
        if self._replan is not None or self._recovering:
            line = f"re-planning after a lost node: {len(self._busy)} of {self._spec.replicas_max} replicas"
            why = self._replan.waiting if self._replan is not None else None
            return f"{line}; {why}" if why else line
        if missing <= 0 or self.plan is None:
            return None
        if not self.started:
            unplaced = self._spec.replicas_max - self.plan.replicas_now
            if unplaced <= 0:  # all placed: they are loading the model
                return (f"starting replicas: {len(self._busy)} of {self._spec.replicas_max} "
                        "hold the model")
            missing = unplaced  # what the placed ones wait for is the model; these, room
        return (
            f"waiting for {missing} of {self._spec.replicas_max} replicas: "
            f"needs {describe(self.plan.replica)}"
        )

    def pick(self) -> Any | None:
        """The least busy ready replica, or None while none is ready."""
        if not self._busy:
            return None
        return min(self._busy, key=self._busy.__getitem__)

    def sent(self, actor: Any) -> None:
        self._busy[actor] += 1

    def done(self, actor: Any) -> None:
        if actor in self._busy:
            self._busy[actor] -= 1

    def lost(self, actor: Any) -> None:
        """A call on ``actor`` failed with it: no more work for it until it answers again."""
        if self._busy.pop(actor, None) is not None:
            self._lost[actor] = time.monotonic() + 1.0

    def report_busy(self, job_id: str, seconds: float) -> None:
        """Export each ready replica's share of ``seconds`` spent in the model, every
        ``BUSY_EVERY_S``, without waiting: the answers are read on a later call."""
        import ray

        if self._busy_asked:
            ready, _ = ray.wait(list(self._busy_asked), num_returns=len(self._busy_asked),
                                timeout=0)
            for ref in ready:
                number = self._busy_asked.pop(ref)
                try:
                    busy = ray.get(ref)
                except ray.exceptions.RayError:
                    continue
                metrics.replica_busy(job_id, number, busy / max(seconds, 1e-9))
        now = time.monotonic()
        if now >= self._next_busy and not self._busy_asked:
            self._next_busy = now + BUSY_EVERY_S
            for actor in self._busy:
                self._busy_asked[actor.busy_seconds.remote()] = self._names[actor]

    def busy_by_replica(self) -> dict[str, float]:
        """Seconds each ready replica has spent in the model, by replica number (best effort)."""
        import ray

        actors = list(self._busy)
        try:
            seconds = ray.get([actor.busy_seconds.remote() for actor in actors], timeout=30)
        except ray.exceptions.RayError:
            return {}
        return {self._names[actor]: busy for actor, busy in zip(actors, seconds, strict=True)}

    def surviving(self, refs: list[Any]) -> set[Any]:
        """The decode results among ``refs`` that are done and kept on a node still alive."""
        import ray
        from ray.experimental import get_object_locations

        if not refs:
            return set()
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        alive = {node.node_id for node in live_nodes()}
        where = get_object_locations(done)
        return {ref for ref in done if alive & set(where.get(ref, {}).get("node_ids") or ())}

    def stop(self) -> None:
        """Free every replica and the reservation (its CPUs and GPUs) now."""
        from ray.util.placement_group import remove_placement_group

        self._kill_replicas()
        for group in (self._group, self._replan.group if self._replan else None):
            if group is not None:
                remove_placement_group(group)
        self._group, self._replan = None, None

    def _kill_replicas(self) -> None:
        """Stop every replica now; calls in flight on them fail, and the driver sends them again."""
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors.clear()
        self._starting.clear()
        self._busy.clear()
        self._lost.clear()
        self._busy_asked.clear()


def _selectors(current: Plan) -> list[dict[str, str]]:
    """Per-bundle label selectors: decode bundles stay off the GPU nodes when the plan can."""
    avoid = {}
    if current.avoid_nodes:
        avoid = {NODE_ID_LABEL: f"!in({','.join(current.avoid_nodes)})"}
    return [{} for _ in range(current.replicas_now)] + [
        dict(avoid) for _ in range(current.decode_tasks)
    ]


def _ask(current: Plan) -> Any:
    """A placement group for ``current``'s bundles (placed whole or not at all)."""
    from ray.util.placement_group import placement_group

    return placement_group(
        current.bundles(), strategy="SPREAD", bundle_label_selector=_selectors(current)
    )


def _state(group: Any) -> str:
    """``CREATED`` while every bundle is placed; ``RESCHEDULING`` after a lost node, etc."""
    from ray.util.placement_group import placement_group_table

    return str(placement_group_table(group).get("state", ""))


def _nodes_without(group: Any) -> list[NodeView]:
    """The live nodes as they will be once ``group`` is removed: its bundles' room freed."""
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(group)
    held: dict[str, dict[str, float]] = {}
    for index, node_id in (table.get("bundles_to_node_id") or {}).items():
        room = held.setdefault(node_id, {})
        for key, value in (table.get("bundles") or {}).get(index, {}).items():
            room[key] = room.get(key, 0.0) + float(value)
    return [
        NodeView(n.node_id, n.total, {k: n.free.get(k, 0.0) + held.get(n.node_id, {}).get(k, 0.0)
                                      for k in set(n.free) | set(held.get(n.node_id, {}))})
        for n in live_nodes()
    ]


def _placed(group: Any, timeout: float) -> bool:
    import ray

    ready, _ = ray.wait([group.ready()], timeout=timeout)
    return bool(ready)
