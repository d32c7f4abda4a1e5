"""Running one job from the store to its end, keeping its record up to date.

The worker claims the job (QUEUED -> RUNNING, which exactly one claimant wins), runs the
pipeline, writes its progress to the record every few seconds, stops when a cancel is
requested, and records how it ended: SUCCEEDED with its summary, CANCELLED, or FAILED through
``job.fail`` with the error's type and message. The same code runs in ``submit --wait`` on the
embedded default and as the entrypoint of a Ray job on a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from batchinf.errors import BatchinfError, JobError
from batchinf.job import Job, JobState, fail, transition
from batchinf.pipeline import Progress, run_job
from batchinf.store import JobStore

RECORD_EVERY_S = 2.0


class _RecordKeeper:
    """Writes progress to the record at most every ``RECORD_EVERY_S``; remembers cancels."""

    def __init__(self, store: JobStore, job: Job, on_progress: Callable[[Progress], None] | None):
        self._store = store
        self._job = job
        self._on_progress = on_progress
        self._last = 0.0
        self.cancel_requested = job.cancel_requested

    def progress(self, progress: Progress) -> None:
        if self._on_progress is not None:
            self._on_progress(progress)
        if time.monotonic() - self._last >= RECORD_EVERY_S:
            self._write(progress.rows_done, progress.rows_failed, progress.rows_total)

    def should_stop(self) -> bool:
        if time.monotonic() - self._last >= RECORD_EVERY_S:
            self._write(self._job.rows_done, self._job.rows_failed, self._job.rows_total)
        return self.cancel_requested

    def _write(self, done: int, failed: int, total: int | None) -> None:
        self._last = time.monotonic()
        self._job = self._store.record_progress(
            self._job.job_id, done, failed, total, ray_job_id=self._job.ray_job_id
        )
        self.cancel_requested = self._job.cancel_requested


def execute(
    store: JobStore,
    job_id: str,
    run_id: str,
    on_progress: Callable[[Progress], None] | None = None,
) -> Job:
    """Claim a QUEUED job for ``run_id``, run it here, and return its final record."""
    job = store.claim(job_id, run_id)
    if job is None:
        current = store.get(job_id)
        raise JobError(f"job {job_id} is {current.state.value}, not QUEUED: nothing to run")
    keeper = _RecordKeeper(store, job, on_progress)
    try:
        result = run_job(job_id, job.spec, keeper.progress, keeper.should_stop)
    except KeyboardInterrupt:
        _finish(store, job_id, run_id, lambda j: transition(j, JobState.CANCELLED))
        raise
    except BatchinfError as exc:
        return _finish(store, job_id, run_id, lambda j: fail(j, type(exc).__name__, str(exc)))
    except Exception as exc:  # an unexpected crash still ends the record, never leaves it RUNNING
        _finish(store, job_id, run_id, lambda j: fail(j, type(exc).__name__, str(exc)))
        raise
    summary = result.summary
    end = JobState.CANCELLED if result.cancelled else JobState.SUCCEEDED

    def finished(j: Job) -> Job:
        done = transition(j, end)
        done.summary = summary
        done.rows_total = summary["rows_total"]
        done.rows_done = summary["rows_ok"] + summary["rows_failed"]
        done.rows_failed = summary["rows_failed"]
        return done

    return _finish(store, job_id, run_id, finished)


def _finish(store: JobStore, job_id: str, run_id: str, change: Callable[[Job], Job]) -> Job:
    """End this run's attempt, unless another run has taken the job over meanwhile."""

    def guarded(job: Job) -> Job:
        if job.state is not JobState.RUNNING or job.ray_job_id != run_id:
            return job
        return change(job)

    return store.update(job_id, guarded)
