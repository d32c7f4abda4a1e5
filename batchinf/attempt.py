"""Running one job from the store to its end, keeping its record up to date.

The worker claims the job (QUEUED -> RUNNING, which exactly one claimant wins), runs the
pipeline, writes its progress to the record every few seconds, stops when a cancel is
requested, and records how it ended: SUCCEEDED with its summary, CANCELLED, or FAILED through
``job.fail`` with the error's type and message. The same code runs in ``submit --wait`` on the
embedded default and as the entrypoint of a Ray job on a cluster: there it is where the job's
process starts, so it reads the settings once (``Settings.from_env()``, what the dispatcher
passed on) and hands them down to the pipeline.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

from batchinf import drift, metrics
from batchinf.errors import BatchinfError, InfrastructureError, JobError
from batchinf.job import MAX_ATTEMPTS, Job, JobState, fail, retry_delay, retry_later, transition
from batchinf.jobstore import JobStore
from batchinf.ledger import Ledger
from batchinf.pipeline import run_job
from batchinf.progress import Progress
from batchinf.raycluster import process_is_gone
from batchinf.settings import Settings

log = logging.getLogger("batchinf.attempt")

RECORD_EVERY_S = 2.0
STALLED_AFTER_S = 10.0  # no row done for this long: the record's speed says 0 (and no ETA)


class _RecordKeeper:
    """Writes the newest progress to the record at most every ``RECORD_EVERY_S`` (and at once
    when what the job waits for changes); remembers cancels.

    Both the pipeline's progress callback and its cancel check write, and both write the
    newest progress it handed over: a follower (``status``, ``wait``, a script) sees rows within
    about ``RECORD_EVERY_S``. While no row moves for ``STALLED_AFTER_S``, the record's speed is
    0, so nobody is shown an ETA the job is not keeping.
    """

    def __init__(self, store: JobStore, job: Job, on_progress: Callable[[Progress], None] | None):
        self._store = store
        self._job = job
        self._on_progress = on_progress
        self._last = 0.0
        self._latest: Progress | None = None
        self._rows_seen = job.rows_done
        self._moved_at = time.monotonic()
        self._waiting: str | None = None
        self.cancel_requested = job.cancel_requested

    def progress(self, progress: Progress) -> None:
        if self._on_progress is not None:
            self._on_progress(progress)
        self._latest = progress
        changed = progress.waiting != self._waiting or (
            progress.rows_total is not None and self._job.rows_total is None
        )
        if changed or self._due():
            self._write()

    def should_stop(self) -> bool:
        if self._due():
            self._write()
        return self.cancel_requested

    def _due(self) -> bool:
        return time.monotonic() - self._last >= RECORD_EVERY_S

    def _write(self) -> None:
        now = time.monotonic()
        self._last = now
        latest, job = self._latest, self._job
        if latest is None:  # nothing handed over yet: keep what the record says
            done, failed, total, rate = job.rows_done, job.rows_failed, job.rows_total, None
        else:
            done, failed, total = latest.rows_done, latest.rows_failed, latest.rows_total
            if done != self._rows_seen:
                self._rows_seen, self._moved_at = done, now
            rate = latest.images_per_s if now - self._moved_at < STALLED_AFTER_S else 0.0
            self._waiting = latest.waiting
        self._job = self._store.record_progress(
            job.job_id,
            done,
            failed,
            total,
            ray_job_id=job.ray_job_id,
            images_per_s=rate,
            runner=this_runner(),
            waiting=self._waiting,
        )
        self.cancel_requested = self._job.cancel_requested


def this_runner() -> dict[str, object]:
    """Where this attempt runs, so a dead runner can be told from a slow one."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def runner_is_gone(job: Job) -> bool:
    """True when the job's runner was on this host and its process no longer exists."""
    runner = job.runner or {}
    return process_is_gone(str(runner.get("host")), int(runner.get("pid") or 0))


def execute(
    store: JobStore,
    job_id: str,
    run_id: str,
    on_progress: Callable[[Progress], None] | None = None,
    settings: Settings | None = None,
) -> Job:
    """Claim a QUEUED job for ``run_id``, run it here, and return its final record.
    ``settings``: the command's; None reads them from the environment."""
    job = store.claim(job_id, run_id)
    if job is None:
        current = store.get(job_id)
        raise JobError(f"job {job_id} is {current.state.value}, not QUEUED: nothing to run")
    return run_claimed(store, job_id, run_id, on_progress, settings)


def run_claimed(
    store: JobStore,
    job_id: str,
    run_id: str,
    on_progress: Callable[[Progress], None] | None = None,
    settings: Settings | None = None,
) -> Job:
    """Run a job already claimed for ``run_id`` (by a dispatcher) and return its final record.
    ``settings``: the command's; None reads them from the environment (a Ray job's entry)."""
    settings = Settings.from_env() if settings is None else settings
    job = store.get(job_id)
    if job.state is not JobState.RUNNING or job.ray_job_id != run_id:
        raise JobError(f"job {job_id} is not running as {run_id}: nothing to do")
    job = store.record_progress(job_id, job.rows_done, job.rows_failed, ray_job_id=run_id,
                                runner=this_runner())
    keeper = _RecordKeeper(store, job, on_progress)
    try:
        baseline = drift.previous_night(store, job)
        scored = Ledger(store.root, job.spec.name) if job.spec.incremental and job.spec.name else None
        result = run_job(job_id, job.spec, keeper.progress, keeper.should_stop, baseline, scored,
                         settings)
    except KeyboardInterrupt:
        _finish(store, job_id, run_id, lambda j: transition(j, JobState.CANCELLED))
        raise
    except BatchinfError as exc:
        return _finish(store, job_id, run_id, _failure(exc, settings))
    except Exception as exc:  # an unexpected crash still ends the record, never leaves it RUNNING
        _finish(store, job_id, run_id, _failure(exc, settings))
        raise
    summary = result.summary
    end = JobState.CANCELLED if result.cancelled else JobState.SUCCEEDED
    if end is JobState.SUCCEEDED and job.spec.name:
        _add_to_ledger(store, job)

    def finished(j: Job) -> Job:
        done = transition(j, end)
        done.summary = summary
        done.rows_total = summary["rows_total"]
        done.rows_done = summary["rows_ok"] + summary["rows_failed"] + summary.get("rows_skipped", 0)
        done.rows_failed = summary["rows_failed"]
        done.images_per_s = summary["images_per_s"]
        done.drift_alert = (summary.get("drift") or {}).get("alert")
        return done

    return _finish(store, job_id, run_id, finished)


def _add_to_ledger(store: JobStore, job: Job) -> None:
    """What a finished night of a spec scored, for its next incremental night. Added before the
    record says SUCCEEDED, and at most once a job, so no SUCCEEDED night is missing from it; a
    ledger that cannot be written costs the next night work, not this night its result."""
    ledger = Ledger(store.root, str(job.spec.name))
    try:
        ledger.record_output(job.job_id, job.spec.output)
        ledger.maybe_compact()
    except (BatchinfError, OSError, ValueError) as exc:  # pyarrow's errors are ValueErrors
        log.warning("job %s: not added to the ledger of %s: %s", job.job_id, job.spec.name, exc)


def abandon(
    store: JobStore, job_id: str, run_id: str, exc: BaseException, settings: Settings | None = None
) -> Job:
    """End a claimed run that could not start (no Ray to run on) as ``exc`` says."""
    settings = Settings.from_env() if settings is None else settings
    return _finish(store, job_id, run_id, _failure(exc, settings))


def _failure(exc: BaseException, settings: Settings) -> Callable[[Job], Job]:
    """How an attempt that raised ends: retried later if the cluster failed it, else FAILED."""
    kind, message = type(exc).__name__, str(exc)

    def change(job: Job) -> Job:
        if isinstance(exc, InfrastructureError) and job.attempt < MAX_ATTEMPTS:
            return retry_later(job, f"{kind}: {message}", retry_delay(job.attempt, settings))
        return fail(job, kind, message)

    return change


def _finish(store: JobStore, job_id: str, run_id: str, change: Callable[[Job], Job]) -> Job:
    """End this run's attempt, unless another run has taken the job over meanwhile."""

    def guarded(job: Job) -> Job:
        if job.state is not JobState.RUNNING or job.ray_job_id != run_id:
            return job
        return change(job)

    ended = store.update(job_id, guarded)
    if ended.attempts and ended.attempts[-1].get("run_id") == run_id:
        last = ended.attempts[-1]
        reason = (last.get("reason") or "ok").split(":", 1)[0]  # the error type, not the text
        metrics.job_outcome(last["outcome"], reason)
    return ended
