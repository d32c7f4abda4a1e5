"""Ray metrics for the dashboard's Metrics view and Prometheus, all named ``batchinf_*``.

Ray exports them from every process that records them, with its own ``ray_`` prefix (so
``batchinf_images_processed`` is scraped as ``ray_batchinf_images_processed_total``)::

    batchinf_images_processed      counter    job_id, model     rows done (ok or failed)
    batchinf_rows_failed           counter    job_id, error_kind
    batchinf_batch_latency_seconds histogram  model             one batch: sent to a replica -> back
    batchinf_replica_busy_ratio    gauge      job_id, replica   share of time inside the model
    batchinf_jobs                  gauge      state             jobs in the store, by state (dispatcher)
    batchinf_job_outcomes          counter    state, reason     attempts ended: succeeded, failed,
                                                                cancelled, requeued
    batchinf_serve_batch_size      histogram  model             requests per model call (serve)
    batchinf_drift_psi             gauge      job_id, measure   PSI against the previous night

``batchinf_jobs`` is the one exception: the dispatcher is no Ray driver, so it serves that
gauge itself, unprefixed, on its ``--metrics-port`` (``Dispatcher._export_queue``).

The busy share is set every few seconds while a job runs (``PredictorPool.report_busy``) and
once more when it ends, so a dashboard shows an idle replica while it is idle.

Nothing is created at import: metrics are made on first use, in the process that records them,
and recording never fails a job (a process without Ray records nothing).
"""

from __future__ import annotations

import contextlib
from functools import cache
from typing import Any

LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_SIZE_BOUNDARIES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]


@cache
def _metric(name: str) -> Any:
    from ray.util import metrics

    made: dict[str, Any] = {
        "batchinf_images_processed": lambda: metrics.Counter(
            name, description="Images (manifest rows) processed, ok or failed.",
            tag_keys=("job_id", "model")),
        "batchinf_rows_failed": lambda: metrics.Counter(
            name, description="Rows written with an error, by error_kind.",
            tag_keys=("job_id", "error_kind")),
        "batchinf_batch_latency_seconds": lambda: metrics.Histogram(
            name, description="Seconds from sending a batch to a replica to its result.",
            boundaries=LATENCY_BOUNDARIES, tag_keys=("model",)),
        "batchinf_replica_busy_ratio": lambda: metrics.Gauge(
            name, description="Share of the job's processing time a replica spent in the model.",
            tag_keys=("job_id", "replica")),
        "batchinf_job_outcomes": lambda: metrics.Counter(
            name, description="Job attempts ended, by how they ended.",
            tag_keys=("state", "reason")),
        "batchinf_serve_batch_size": lambda: metrics.Histogram(
            name, description="Online requests answered by one model call.",
            boundaries=BATCH_SIZE_BOUNDARIES, tag_keys=("model",)),
        "batchinf_drift_psi": lambda: metrics.Gauge(
            name, description="Population stability index of a job against its baseline night.",
            tag_keys=("job_id", "measure")),
    }
    return made[name]()


def _record(name: str, method: str, value: float, tags: dict[str, str]) -> None:
    with contextlib.suppress(Exception):  # metrics must never fail a job
        import ray

        if ray.is_initialized():
            getattr(_metric(name), method)(value, tags=tags)


def batch_done(job_id: str, model: str, rows: int, failed_by_kind: dict[str, int], seconds: float) -> None:
    """One batch came back: its rows, its failed rows by kind, its latency."""
    _record("batchinf_images_processed", "inc", rows, {"job_id": job_id, "model": model})
    for kind, count in failed_by_kind.items():
        _record("batchinf_rows_failed", "inc", count, {"job_id": job_id, "error_kind": kind})
    _record("batchinf_batch_latency_seconds", "observe", seconds, {"model": model})


def replica_busy(job_id: str, replica: str, ratio: float) -> None:
    """A replica's share of the job's processing time so far spent inside the model."""
    _record("batchinf_replica_busy_ratio", "set", ratio, {"job_id": job_id, "replica": replica})


def job_outcome(state: str, reason: str) -> None:
    _record("batchinf_job_outcomes", "inc", 1, {"state": state, "reason": reason})


def serve_batch(model: str, size: int) -> None:
    _record("batchinf_serve_batch_size", "observe", size, {"model": model})


def drift_psi(job_id: str, measure: str, value: float) -> None:
    _record("batchinf_drift_psi", "set", value, {"job_id": job_id, "measure": measure})
