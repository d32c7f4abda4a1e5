"""A job is data: what the user asked for (``JobSpec``) and where it stands (``Job``).

Records outlive processes, so every state change goes through one door, ``transition``, which
checks the one table of legal moves (``check_transition``)::

    QUEUED    -> RUNNING | CANCELLED | FAILED
    RUNNING   -> SUCCEEDED | FAILED | CANCELLED | QUEUED   (QUEUED: requeued, its Ray job vanished)
    FAILED    -> QUEUED                                     (resume)
    CANCELLED -> QUEUED                                     (resume)
    SUCCEEDED -> (final)

A job fails through one function, ``fail``, which records the error's type, message and attempt.
Records are plain JSON dicts (never pickle); ``from_dict`` ignores keys it does not know, so a
record written by a newer batchinf stays readable by an older one.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from batchinf.errors import IllegalTransition, JobError, UsageError
from batchinf.settings import DEFAULTS, Settings

MAX_ATTEMPTS = 3  # attempts the infrastructure may end before the job fails
HISTORY_KEPT = 20  # entries of ``attempts`` a record keeps (the newest); older ones are counted


class JobState(StrEnum):
    """Where a job stands; a ``str`` whose value (the upper-case name) is what records store."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True when nothing runs any more (it may still be resumed unless SUCCEEDED)."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
    ),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
}


def check_transition(old: JobState, new: JobState) -> None:
    """Raise ``IllegalTransition`` unless the table allows ``old -> new``."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"a {old.value} job cannot become {new.value}")


# What a challenger adds to each output row (``--challenger``; sink.py writes them).
CHALLENGER_COLUMNS = ("challenger_predictions", "challenger_top1_label", "challenger_top1_score",
                      "challenger_model_name", "challenger_model_version")


@dataclass
class JobSpec:
    """What the user asked for; fixed once the job is created."""

    manifest: str
    model: str
    output: str
    top_k: int = 5
    batch_size: int = 64
    replicas_min: int = 1
    replicas_max: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float | None = None  # None: the node's CPUs beside decode (planner.py)
    decode_cpus: float | None = None  # None: 0.5 beside CPU replicas, 4 per GPU (planner.py)
    model_version: int | None = None
    max_error_rate: float = 1.0  # 1.0: row errors never fail the job
    shard_size: int = 1024
    priority: int = 0
    idempotency_key: str | None = None
    replica_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    allowed_buckets: list[str] | None = None  # None: any bucket the deployment allows (access.py)
    name: str | None = None  # the job spec's name: drift compares a night with its previous one
    max_drift_psi: float | None = None  # a PSI over this against the previous night: an alert
    include: list[str] | None = None  # a listing's key globs; None: image extensions (listing.py)
    incremental: bool = False  # score only rows earlier nights of ``name`` did not (ledger.py)
    outputs: list[str] = field(default_factory=list)  # signature outputs written as columns
    challenger: str | None = None  # a second model run on the same decoded images (--challenger)
    challenger_version: int | None = None
    memory_per_replica: float | None = None  # bytes; None: model.replica_memory's estimate

    @property
    def output_columns(self) -> dict[str, str]:
        """Each ``outputs`` name -> the Parquet column that holds it (``output_<name>``)."""
        return {name: output_column(name) for name in self.outputs}

    def validate(self) -> None:
        """Reject a spec no run could honour; the message names the option."""
        if self.top_k < 0:
            raise UsageError(f"--top-k must be 0 (no predictions) or more, got {self.top_k}")
        if not (isinstance(self.outputs, list) and all(
                isinstance(o, str) and o and "," not in o for o in self.outputs)):
            raise UsageError(f"--outputs takes output names, NAME[,NAME], got {self.outputs!r}")
        if len(set(self.outputs)) != len(self.outputs):
            raise UsageError(f"--outputs names an output twice: {','.join(self.outputs)}")
        if self.top_k == 0 and not self.outputs:
            raise UsageError("--top-k 0 writes no predictions: name the outputs to write instead "
                             "with --outputs NAME[,NAME]")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 1 <= self.replicas_min <= self.replicas_max:
            raise UsageError(
                f"--replicas needs 1 <= MIN <= MAX, got {self.replicas_min}:{self.replicas_max}"
            )
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise UsageError(f"--max-error-rate must be within 0..1, got {self.max_error_rate}")
        if self.shard_size < 1:
            raise UsageError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.decode_cpus is not None and self.decode_cpus <= 0:
            raise UsageError(f"--decode-cpus must be above 0, got {self.decode_cpus}")
        if self.gpus_per_replica < 0 or (self.cpus_per_replica or 0) < 0:
            raise UsageError("--gpus-per-replica and --cpus-per-replica cannot be negative")
        for name, amount in self.replica_resources.items():
            if name in ("CPU", "GPU", "memory") or amount <= 0:
                raise UsageError(
                    f"--replica-resources takes custom resources with amounts above 0, got {name}={amount}"
                )
        if self.allowed_buckets is not None and not all(
            isinstance(b, str) and b and "/" not in b for b in self.allowed_buckets
        ):
            raise UsageError(f"--allowed-buckets takes bucket names, got {self.allowed_buckets}")
        if self.include is not None and not (isinstance(self.include, list) and all(
            isinstance(g, str) and g for g in self.include)):
            raise UsageError(f"--include takes glob patterns, got {self.include}")
        if not isinstance(self.incremental, bool):
            raise UsageError(f"incremental takes true or false, got {self.incremental!r}")
        if self.incremental and not self.name:
            raise UsageError("--incremental needs a job spec's name or an --idempotency-key "
                             "(its nights share one ledger of what was scored)")
        if self.max_drift_psi is not None and not self.max_drift_psi > 0:
            raise UsageError(f"--max-drift-psi must be above 0, got {self.max_drift_psi}")
        if self.max_drift_psi is not None and not self.name:
            raise UsageError("--max-drift-psi compares a night with the previous night of its job "
                             "spec: submit a spec (jobs/*.yaml), whose name finds that night")
        if self.model_version is not None and self.model_version < 0:
            raise UsageError(f"--model-version must be a version number, got {self.model_version}")
        if self.memory_per_replica is not None and not (
                isinstance(self.memory_per_replica, int | float) and self.memory_per_replica > 0):
            raise UsageError(f"--memory-per-replica must be a size above 0, got "
                             f"{self.memory_per_replica!r}")
        self._validate_challenger()

    def _validate_challenger(self) -> None:
        if self.challenger_version is not None and not self.challenger:
            raise UsageError("--challenger-version needs --challenger MODEL")
        if self.challenger is None:
            return
        if not isinstance(self.challenger, str) or not self.challenger.strip():
            raise UsageError(f"--challenger takes a model folder or s3:// base, got {self.challenger!r}")
        if self.challenger_version is not None and self.challenger_version < 0:
            raise UsageError(
                f"--challenger-version must be a version number, got {self.challenger_version}")
        if self.top_k == 0:
            raise UsageError("--challenger compares the two models' top-1 classes: it needs "
                             "--top-k 1 or more")
        if (self.challenger.rstrip("/"), self.challenger_version) == (
                self.model.rstrip("/"), self.model_version) and self.model_version is not None:
            raise UsageError("--challenger names the champion itself: give another model or "
                             "--challenger-version")

    def check_columns(self, columns: tuple[str, ...]) -> None:
        """``UsageError`` if a manifest column has the name of a column ``outputs`` or the
        challenger writes."""
        clashing = [c for c in self.output_columns.values() if c in columns]
        if clashing:
            raise UsageError(f"--outputs would write column(s) {', '.join(clashing)}, which the "
                             f"manifest has already")
        taken = [c for c in CHALLENGER_COLUMNS if self.challenger and c in columns]
        if taken:
            raise UsageError(f"--challenger would write column(s) {', '.join(taken)}, which the "
                             f"manifest has already")

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """Rebuild a spec, ignoring keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Job:
    """One job record: its spec, its state and what happened so far."""

    job_id: str
    spec: JobSpec
    state: JobState
    created_at: float
    updated_at: float
    started_at: float | None = None
    ended_at: float | None = None
    attempt: int = 0  # +1 each time the job goes RUNNING
    ray_job_id: str | None = None  # Ray submission id of the current attempt
    rows_total: int | None = None
    rows_done: int = 0
    rows_failed: int = 0
    error: dict[str, Any] | None = None  # {"type", "message", "attempt"}
    summary: dict[str, Any] | None = None
    cancel_requested: bool = False
    images_per_s: float | None = None  # speed of the current attempt, from its runner
    runner: dict[str, Any] | None = None  # {"host", "pid"} of the process running the attempt
    ray_address: str | None = None  # Ray Jobs API address the attempt was submitted to
    waiting: str | None = None  # what the running attempt waits for (resources), if anything
    retry_at: float | None = None  # a requeued attempt is not launched before this time
    attempts: list[dict[str, Any]] = field(default_factory=list)  # how the newest attempts ended
    attempts_dropped: int = 0  # older entries of ``attempts`` no longer kept (HISTORY_KEPT)
    launch_refusals: int = 0  # launches the cluster refused in a row (reset when one is taken)
    launch_error: str | None = None  # why the last launch was refused
    drift_alert: dict[str, Any] | None = None  # {"measure", "value", "limit", "against"} (drift.py)

    @classmethod
    def new(cls, spec: JobSpec, *, job_id: str | None = None, now: float | None = None) -> Job:
        """A fresh QUEUED job for ``spec``."""
        now = time.time() if now is None else now
        return cls(
            job_id=job_id or new_job_id(now),
            spec=spec,
            state=JobState.QUEUED,
            created_at=now,
            updated_at=now,
        )

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain JSON-able dict."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["spec"] = self.spec.to_dict()
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        """Rebuild a job from its record, ignoring keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            values["spec"] = JobSpec.from_dict(values["spec"])
            values["state"] = JobState(values["state"])
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise JobError(f"unreadable job record {data.get('job_id')!r}: {exc}") from exc


def output_column(name: str) -> str:
    """The Parquet column of the signature output ``name``: ``output_<name>``, a prefix that no
    column batchinf writes has, so only a manifest column of that very name can collide."""
    return f"output_{name}"


_ID_TIME_FORMAT = "%Y%m%d-%H%M%S"


def new_job_id(now: float | None = None) -> str:
    """A readable id that sorts by creation time, such as ``bi-20261121-213000-3f9a1c`` (UTC)."""
    stamp = time.strftime(_ID_TIME_FORMAT, time.gmtime(time.time() if now is None else now))
    return f"bi-{stamp}-{secrets.token_hex(3)}"


LOCAL_RUN_PREFIX = "local-"  # a run id of an attempt run in-process (submit --wait, the client)


def local_run_id(job_id: str, attempt: int) -> str:
    """The run id of attempt ``attempt`` run in-process, not as a Ray job: ``local-<job>-a<n>``."""
    return f"{LOCAL_RUN_PREFIX}{job_id}-a{attempt}"


def ran_here(run_id: str | None) -> bool:
    """True when ``run_id`` names an in-process attempt (no Ray job, no dispatcher owns it)."""
    return bool(run_id) and str(run_id).startswith(LOCAL_RUN_PREFIX)


def transition(
    job: Job, new: JobState, *, now: float | None = None, reason: str | None = None
) -> Job:
    """The job moved to ``new``: the one door for state changes (raises ``IllegalTransition``).

    Entering RUNNING starts a new attempt; entering a terminal state stamps ``ended_at``;
    a resume (FAILED or CANCELLED -> QUEUED) clears the last error and cancel request. A requeue
    (RUNNING -> QUEUED) keeps ``cancel_requested``, so a pending cancel is never lost.
    Leaving RUNNING appends how the attempt ended (and ``reason``) to ``attempts``.
    """
    check_transition(job.state, new)
    now = time.time() if now is None else now
    changes: dict[str, Any] = {"state": new, "updated_at": now, "waiting": None}
    if job.state is JobState.RUNNING:
        history = [*job.attempts, _attempt_record(job, new, now, reason)]
        dropped = max(0, len(history) - HISTORY_KEPT)
        changes["attempts"] = history[dropped:]
        changes["attempts_dropped"] = job.attempts_dropped + dropped
    if new is JobState.RUNNING:
        changes.update(attempt=job.attempt + 1, started_at=now, ended_at=None, retry_at=None)
    elif new.terminal:
        changes["ended_at"] = now
    elif job.state.terminal:  # resume into QUEUED
        changes.update(
            ended_at=None, error=None, cancel_requested=False, ray_job_id=None, runner=None
        )
    else:  # requeue RUNNING -> QUEUED: the attempt's Ray job is gone
        changes.update(ray_job_id=None, runner=None)
    return dataclasses.replace(job, **changes)


def fail(job: Job, exc_type: str, message: str, *, now: float | None = None) -> Job:
    """The job moved to FAILED with its error recorded: the one failure door."""
    failed = transition(job, JobState.FAILED, now=now, reason=f"{exc_type}: {message}")
    failed.error = {"type": exc_type, "message": message, "attempt": job.attempt}
    return failed


def retry_later(job: Job, reason: str, delay_s: float, *, now: float | None = None) -> Job:
    """A RUNNING attempt that infrastructure ended goes back to QUEUED, to be launched again
    (resuming from its committed parts) no sooner than ``delay_s`` from now."""
    now = time.time() if now is None else now
    requeued = transition(job, JobState.QUEUED, now=now, reason=reason)
    requeued.retry_at = now + delay_s
    return requeued


def retry_delay(attempt: int, settings: Settings = DEFAULTS) -> float:
    """Seconds before attempt ``attempt + 1`` after an infrastructure failure: doubling from
    ``settings.retry_delay``, capped at 5 minutes."""
    return float(min(300.0, settings.retry_delay * 2 ** max(0, attempt - 1)))


def launch_backoff(refusals: int, settings: Settings = DEFAULTS) -> float:
    """Seconds before launching again after ``refusals`` refused launches in a row: doubling
    from ``settings.launch_backoff``, capped at 10 minutes."""
    return float(min(600.0, settings.launch_backoff * 2 ** max(0, refusals - 1)))


def refuse_launch(
    job: Job, run_id: str, reason: str, *, settings: Settings = DEFAULTS, now: float | None = None
) -> Job:
    """The cluster refused to launch ``run_id``: back to QUEUED with a back-off, or FAILED once
    ``settings.launch_refusals`` launches in a row were refused. The attempt never started,
    so it does not count against ``MAX_ATTEMPTS`` and adds no history: a job refused for days
    keeps a record of the same size. Unchanged if the job no longer runs as ``run_id``.
    """
    if job.state is not JobState.RUNNING or job.ray_job_id != run_id:
        return job
    now = time.time() if now is None else now
    refusals = job.launch_refusals + 1
    if refusals >= max(1, settings.launch_refusals):
        failed = fail(job, "LaunchRefused",
                      f"launch refused by the cluster {refusals} times in a row: {reason}", now=now)
        failed.attempt = max(0, job.attempt - 1)
        failed.launch_refusals, failed.launch_error = refusals, reason
        return failed
    requeued = transition(job, JobState.QUEUED, now=now)
    requeued.attempts, requeued.attempts_dropped = job.attempts, job.attempts_dropped
    requeued.attempt = max(0, job.attempt - 1)
    requeued.retry_at = now + launch_backoff(refusals, settings)
    requeued.launch_refusals, requeued.launch_error = refusals, reason
    return requeued


def _attempt_record(job: Job, new: JobState, now: float, reason: str | None) -> dict[str, Any]:
    outcome = "requeued" if new is JobState.QUEUED else new.value.lower()
    return {
        "attempt": job.attempt,
        "run_id": job.ray_job_id,
        "started_at": job.started_at,
        "ended_at": now,
        "outcome": outcome,
        "reason": reason,
        "rows_done": job.rows_done,
    }


__all__ = [
    "MAX_ATTEMPTS",
    "TRANSITIONS",
    "Job",
    "JobSpec",
    "JobState",
    "check_transition",
    "fail",
    "launch_backoff",
    "local_run_id",
    "new_job_id",
    "output_column",
    "ran_here",
    "refuse_launch",
    "retry_delay",
    "retry_later",
    "transition",
]
