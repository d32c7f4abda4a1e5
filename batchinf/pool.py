"""The replica pool: predictor actors that each hold the model, and the resource plan.

The plan keeps one CPU (half of a one-CPU node) out of the replicas' reservation so the decode
tasks that feed them can always be scheduled: a pool whose replicas reserve every CPU starves
its own decode stage and hangs. The reservation is Ray's bookkeeping only; how many threads
TensorFlow uses in each replica is set separately (``BATCHINF_TF_THREADS``).
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from batchinf.errors import JobFailed, ModelError
from batchinf.job import JobSpec
from batchinf.model import ModelSource
from batchinf.predictor import ModelInfo, Predictor

START_TIMEOUT_S = float(os.environ.get("BATCHINF_REPLICA_START_TIMEOUT", "600"))


@dataclass(frozen=True)
class Resources:
    """How much each replica and each decode task reserves, and how much work may be queued."""

    replica_cpus: float
    replica_gpus: float
    decode_cpus: float
    max_in_flight: int
    tf_threads: int | None


def plan_resources(cluster: dict[str, float], spec: JobSpec) -> Resources:
    """Fit the replicas and their decode stage on the cluster without starving either."""
    total = float(cluster.get("CPU", 1.0))
    decode_reserve = min(1.0, total / 2)
    fair_share = max(0.0, (total - decode_reserve) / spec.replicas_max)
    replica_cpus = round(min(spec.cpus_per_replica, fair_share), 3)
    threads = os.environ.get("BATCHINF_TF_THREADS")
    return Resources(
        replica_cpus=replica_cpus,
        replica_gpus=spec.gpus_per_replica,
        decode_cpus=decode_reserve,
        max_in_flight=3 * spec.replicas_max + 1,
        tf_threads=int(threads) if threads else None,
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
            ).remote(self._source, self._spec.top_k, self._resources.tf_threads)
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
