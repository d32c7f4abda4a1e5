"""The replica pool: predictor actors that each hold the model, and the resource plan.

The plan keeps one CPU (half of a one-CPU node) out of the replicas' reservation so the decode
tasks that feed them can always be scheduled: a pool whose replicas reserve every CPU starves
its own decode stage and hangs. The reservation is Ray's bookkeeping only; how many threads
TensorFlow uses in each replica is set separately (``BATCHINF_TF_THREADS``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from batchinf.decode import DECODE_NICE, FETCH_THREADS
from batchinf.errors import JobFailed, ModelError
from batchinf.job import JobSpec
from batchinf.model import ModelSource
from batchinf.predictor import ModelInfo, Predictor

START_TIMEOUT_S = float(os.environ.get("BATCHINF_REPLICA_START_TIMEOUT", "600"))


DECODE_CPUS_PER_GPU = 4.0  # docs/performance.md: a GPU replica outruns one CPU of decode ~10x


@dataclass(frozen=True)
class Resources:
    """How much each replica and each decode task reserves, and how much work may be queued."""

    replica_cpus: float
    replica_gpus: float
    decode_cpus: float  # what one decode task reserves
    decode_tasks: int  # decode tasks kept running at once
    max_in_flight: int
    tf_threads: int | None  # TensorFlow's intra-op threads per replica (None: one per core)
    fetch_threads: int  # concurrent fetches (and Pillow decodes) inside one decode task
    decode_nice: int  # niceness of the decode threads (0: same priority as the model)

    def to_dict(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)


def plan_resources(cluster: dict[str, float], spec: JobSpec) -> Resources:
    """Fit the replicas and their decode stage on the cluster without starving either.

    Decode always keeps at least one CPU (half of a one-CPU cluster) out of the replicas'
    reservation. How much decode is wanted: ``--decode-cpus`` if given, else one CPU beside
    CPU replicas (a CPU model is ~5x slower per image than decoding a photo), or
    ``DECODE_CPUS_PER_GPU`` per GPU the replicas hold. Each decode task reserves one CPU and
    runs ``BATCHINF_FETCH_THREADS`` fetches; the queue holds two batches per replica plus one
    per decode task, so a replica finds its next batch ready and decode never runs far ahead.
    """
    total = float(cluster.get("CPU", 1.0))
    floor = min(1.0, total / 2)
    fair_share = max(0.0, (total - floor) / spec.replicas_max)
    replica_cpus = math.floor(1000 * min(spec.cpus_per_replica, fair_share)) / 1000
    gpus = spec.gpus_per_replica * spec.replicas_max
    wanted = spec.decode_cpus or (DECODE_CPUS_PER_GPU * gpus if gpus else 1.0)
    free = total - replica_cpus * spec.replicas_max
    decode_total = max(floor, min(wanted, free))
    decode_cpus = min(1.0, decode_total)
    decode_tasks = max(1, int(decode_total // decode_cpus))
    threads = os.environ.get("BATCHINF_TF_THREADS")
    return Resources(
        replica_cpus=replica_cpus,
        replica_gpus=spec.gpus_per_replica,
        decode_cpus=decode_cpus,
        decode_tasks=decode_tasks,
        max_in_flight=2 * spec.replicas_max + decode_tasks + 1,
        tf_threads=int(threads) if threads else None,
        fetch_threads=int(os.environ.get("BATCHINF_FETCH_THREADS") or FETCH_THREADS),
        decode_nice=int(os.environ.get("BATCHINF_DECODE_NICE") or DECODE_NICE),
    )


class PredictorPool:
    """Predictor actors, picked least-busy first; replicas that start late join when ready."""

    def __init__(
        self, source: ModelSource, spec: JobSpec, resources: Resources, name_prefix: str
    ) -> None:
        self._source = source
        self._spec = spec
        self._resources = resources
        self._prefix = f"{name_prefix}-{secrets.token_hex(2)}"
        self._actors: list[Any] = []
        self._starting: dict[Any, Any] = {}  # ready() ref -> actor
        self._busy: dict[Any, int] = {}  # ready actor -> batches sent and not yet back

    @property
    def max_in_flight(self) -> int:
        return max(self._resources.max_in_flight, 2 * len(self._busy) + 1)

    def start(self) -> ModelInfo:
        """Start the replicas and wait for at least ``replicas_min`` of them to hold the model."""
        import ray

        remote = ray.remote(Predictor)
        for number in range(self._spec.replicas_max):
            actor = remote.options(
                name=f"{self._prefix}-predictor-{number}",
                num_cpus=self._resources.replica_cpus,
                num_gpus=self._resources.replica_gpus,
                max_restarts=2,
                max_task_retries=2,
                scheduling_strategy="SPREAD",
            ).remote(
                self._source, self._spec.top_k, self._resources.tf_threads, self._spec.batch_size
            )
            self._actors.append(actor)
            self._starting[actor.ready.remote()] = actor
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(self._busy) < self._spec.replicas_min:
            if time.monotonic() > deadline:
                raise JobFailed(
                    f"only {len(self._busy)} of {self._spec.replicas_min} replicas started within "
                    f"{START_TIMEOUT_S:.0f}s: the cluster lacks the CPUs/GPUs they ask for"
                )
            self.refresh(timeout=1.0)
        first = next(iter(self._busy))
        return ray.get(first.describe.remote())

    def refresh(self, timeout: float = 0.0) -> None:
        """Let replicas that have finished loading the model take work."""
        import ray

        if not self._starting:
            return
        ready, _ = ray.wait(list(self._starting), num_returns=len(self._starting), timeout=timeout)
        for ref in ready:
            actor = self._starting.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise ModelError(f"a model replica failed to start: {_root_cause(exc)}") from exc
            self._busy[actor] = 0

    def pick(self) -> Any:
        return min(self._busy, key=self._busy.__getitem__)

    def sent(self, actor: Any) -> None:
        self._busy[actor] += 1

    def done(self, actor: Any) -> None:
        self._busy[actor] -= 1

    def busy_seconds(self) -> list[float]:
        """Seconds each ready replica has spent inside the model (best effort: [] on failure)."""
        import ray

        try:
            return ray.get([actor.busy_seconds.remote() for actor in self._busy], timeout=30)
        except ray.exceptions.RayError:
            return []

    def stop(self) -> None:
        """Free every replica (and its CPUs or GPUs) now."""
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors.clear()
        self._starting.clear()
        self._busy.clear()


def _root_cause(exc: BaseException) -> str:
    """The last line of the original error that Ray wrapped, e.g. ``ModelError: ...``."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error:" in line or "Exception:" in line:
            return line.split("batchinf.errors.", 1)[-1]
    return lines[-1] if lines else type(exc).__name__
