"""The durable job store: the source of truth for every job, on a local folder or an S3 prefix.

Layout under the root URI::

    <root>/jobs/<job_id>.json                  the job record (``Job.to_dict()`` as JSON)
    <root>/keys/<sha256(idempotency_key)>.json  {"idempotency_key", "job_id", "job"}
    <root>/state/<STATE>/<job_id>               an empty entry per job, in the folder of its state
    <root>/state.json                           written once the state index covers every record

The state index keeps what a dispatcher round, ``list --state`` and a new job's output check
cost in proportion to the jobs they ask about, not to the store's history: an idle round lists
``state/QUEUED`` and ``state/RUNNING`` (two requests however many nights the store has seen).
The record is the truth and the index a guide to it: an entry for a job's new state is written
before its record changes and again after, and the old state's entry is removed after, so a job
is always found in its own state's folder; an entry that disagrees with its record (a writer that
died between the writes) is skipped by readers and removed by ``prune``. A store written before
the index existed is indexed once, by the first reader that finds no ``state.json``.

Records are created with ``if_none_match`` and changed by compare-and-swap (read record and
etag, apply a change, write with ``if_match=etag``, retry on conflict), so racing dispatchers,
runners and cancels cannot corrupt a job: of two QUEUED -> RUNNING claims exactly one wins and
the other meets ``IllegalTransition``. The atomicity itself is the storage's: S3 and MinIO check
the condition and write as one step; a local folder uses exclusive create and a lock around
compare-then-rename (see ``batchinf.storage``).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from batchinf import storage
from batchinf.errors import (
    IllegalTransition,
    JobError,
    JobNotFound,
    NotFoundError,
    OutputTaken,
    PreconditionFailed,
)
from batchinf.job import Job, JobSpec, JobState, check_transition, local_run_id, transition
from batchinf.settings import Settings

CAS_TRIES = 50
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_store_uri() -> str:
    """``BATCHINF_STORE`` if set, else ``~/.batchinf`` (the embedded mode's local store)."""
    return Settings.from_env().store_uri


def _held(job: Job, runner: dict[str, Any] | None) -> Job:
    """A new job as created: QUEUED, or with ``runner`` RUNNING as its first in-process attempt."""
    if runner is None:
        return job
    running = transition(job, JobState.RUNNING, now=job.created_at)
    running.ray_job_id = local_run_id(job.job_id, running.attempt)
    running.runner = dict(runner)
    return running


def _encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode("utf-8")


def _decode(raw: bytes, uri: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise JobError(f"not a JSON record: {uri}") from exc
    if not isinstance(data, dict):
        raise JobError(f"not a JSON object: {uri}")
    return data


class JobStore:
    """Job records under one root URI (a local folder or ``s3://bucket/prefix``)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._indexed = False

    @classmethod
    def from_uri(cls, uri: str | None = None) -> JobStore:
        """A store at ``uri`` (``~`` expanded), or at ``default_store_uri()`` when None."""
        uri = uri or default_store_uri()
        if storage.is_s3(uri):
            storage.split_s3(uri)  # a bucket is required
            return cls(uri.rstrip("/"))
        return cls(os.path.expanduser(storage.local_path(uri)))

    def __repr__(self) -> str:
        return f"JobStore({self.root!r})"

    # -- where things live ---------------------------------------------------------------------

    def _job_uri(self, job_id: str) -> str:
        if not _JOB_ID.match(job_id):
            raise JobNotFound(f"no such job: {job_id!r}")
        return storage.join(self.root, "jobs", f"{job_id}.json")

    def _key_uri(self, idempotency_key: str) -> str:
        digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()
        return storage.join(self.root, "keys", f"{digest}.json")

    def _state_uri(self, state: JobState | str, job_id: str) -> str:
        return storage.join(self.root, "state", JobState(state).value, job_id)

    # -- the state index -----------------------------------------------------------------------

    def _index(self, job_id: str, state: JobState) -> None:
        storage.write_bytes(self._state_uri(state, job_id), b"")

    def _unindex(self, job_id: str, state: JobState) -> None:
        storage.delete(self._state_uri(state, job_id))

    def _ensure_index(self) -> None:
        """Index a store written before the state index existed: once, then a marker says so."""
        if self._indexed:
            return
        marker = storage.join(self.root, "state.json")
        if not storage.exists(marker):
            for job in self._read_many(self._all_ids()):
                self._index(job.job_id, job.state)
            storage.write_bytes(marker, _encode({"version": 1}))
        self._indexed = True

    def _all_ids(self) -> builtins.list[str]:
        names = storage.list_names(storage.join(self.root, "jobs"))
        ids = [n.removesuffix(".json") for n in names if n.endswith(".json")]
        return [i for i in ids if _JOB_ID.match(i)]

    def ids_in(self, states: Iterable[JobState | str]) -> builtins.list[str]:
        """Ids of the jobs the index files under ``states`` (one listing per state), sorted.

        An id may be stale (its record moved on): read the records to be sure.
        """
        self._ensure_index()
        found: set[str] = set()
        for state in {JobState(s) for s in states}:
            names = storage.list_names(storage.join(self.root, "state", state.value))
            found.update(n for n in names if _JOB_ID.match(n))
        return sorted(found)

    def _read_many(self, ids: Iterable[str]) -> builtins.list[Job]:
        ids = builtins.list(ids)
        if len(ids) <= 1:
            return [job for job in map(self._get_or_none, ids) if job is not None]
        with ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:  # S3 reads wait on latency
            return [job for job in pool.map(self._get_or_none, ids) if job is not None]

    # -- create and read -----------------------------------------------------------------------

    def create(
        self, spec: JobSpec, *, now: float | None = None, runner: dict[str, Any] | None = None
    ) -> tuple[Job, bool]:
        """Create a QUEUED job for ``spec``; returns the job and whether it is new.

        With ``runner`` (``{"host", "pid"}`` of the process that will run the job itself), a
        new job is created already RUNNING as that process's first in-process attempt
        (``local_run_id(job_id, 1)``): held from its first write, so no dispatcher can take it
        before its submitter runs it.

        With an idempotency key already used, returns that key's job (whatever its state and
        spec) and False. The key object is written first, holding the whole initial record, so
        a submitter that dies between the two writes leaves a key the next submit completes
        (as a QUEUED job: the dead submitter holds nothing).
        """
        if spec.idempotency_key is None:
            self._check_output_free(spec)
            for _ in range(5):  # ids collide only within one second, 1 in 16M: retrying is enough
                job = _held(Job.new(spec, now=now), runner)
                if self._write_new(job):
                    return job, True
            raise JobError("could not find a free job id")
        key_uri = self._key_uri(spec.idempotency_key)
        if not storage.exists(key_uri):
            self._check_output_free(spec)
        job, created = self._claim_key(spec.idempotency_key, Job.new(spec, now=now))
        if created:
            job = _held(job, runner)
        if not self._write_new(job):  # written already, by the key's first submitter
            job = self.get(job.job_id)
        return job, created

    def _check_output_free(self, spec: JobSpec) -> None:
        """Refuse a new job whose output a QUEUED or RUNNING job will write (reads only those)."""
        wanted = spec.output.rstrip("/")
        for job in self.list({JobState.QUEUED, JobState.RUNNING}):
            if spec.idempotency_key is not None and job.spec.idempotency_key == spec.idempotency_key:
                continue  # the key's own job, made by a racing submit: the key returns it
            if job.spec.output.rstrip("/") == wanted:
                raise OutputTaken(
                    f"output {spec.output} is taken by job {job.job_id} ({job.state.value}); "
                    "choose another output, or cancel that job"
                )

    def _claim_key(self, idempotency_key: str, job: Job) -> tuple[Job, bool]:
        """The job the key stands for (``job`` if this call took the key) and whether it did."""
        key_uri = self._key_uri(idempotency_key)
        entry = {"idempotency_key": idempotency_key, "job_id": job.job_id, "job": job.to_dict()}
        try:
            storage.write_bytes(key_uri, _encode(entry), if_none_match=True)
            return job, True
        except PreconditionFailed:
            pass
        record = _decode(storage.read_bytes(key_uri), key_uri).get("job")
        if not isinstance(record, dict):
            raise JobError(f"idempotency key record without a job: {key_uri}")
        return Job.from_dict(record), False

    def _write_new(self, job: Job) -> bool:
        """Write a job's first record (and its index entry); False if a record with its id exists."""
        uri = self._job_uri(job.job_id)
        self._index(job.job_id, job.state)
        try:
            storage.write_bytes(uri, _encode(job.to_dict()), if_none_match=True)
        except PreconditionFailed:
            return False
        return True

    def _read(self, job_id: str) -> tuple[Job, str]:
        uri = self._job_uri(job_id)
        try:
            raw, etag = storage.read_with_etag(uri)
        except NotFoundError as exc:
            raise JobNotFound(f"no such job: {job_id}") from exc
        return Job.from_dict(_decode(raw, uri)), etag

    def get(self, job_id: str) -> Job:
        """The job's current record (``JobNotFound`` if there is none)."""
        return self._read(job_id)[0]

    def list(self, states: Iterable[JobState | str] | None = None) -> builtins.list[Job]:
        """Every job (or those in ``states``, read through the state index), oldest first."""
        if states is None:
            found = self._read_many(self._all_ids())
        else:
            wanted = {JobState(s) for s in states}
            found = [j for j in self._read_many(self.ids_in(wanted)) if j.state in wanted]
        return sorted(found, key=lambda j: (j.created_at, j.job_id))

    def page(
        self,
        states: Iterable[JobState | str] | None = None,
        *,
        limit: int = 50,
        before: str | None = None,
    ) -> tuple[builtins.list[Job], str | None]:
        """Up to ``limit`` jobs (in ``states``), newest first, older than job ``before`` if
        given; and the id to pass as ``before`` for the next page (None on the last page).

        Ids sort by creation time, so a page reads only its own records (plus listings).
        """
        wanted = None if states is None else {JobState(s) for s in states}
        ids = self._all_ids() if wanted is None else self.ids_in(wanted)
        ids = [i for i in reversed(ids) if before is None or i < before]
        jobs: builtins.list[Job] = []
        while ids and len(jobs) < limit:
            chunk, ids = ids[: limit - len(jobs)], ids[limit - len(jobs) :]
            read = {j.job_id: j for j in self._read_many(chunk)}
            jobs += [read[i] for i in chunk if i in read and (wanted is None or read[i].state in wanted)]
        return jobs, (jobs[-1].job_id if jobs and ids else None)

    def _get_or_none(self, job_id: str) -> Job | None:
        try:
            return self.get(job_id)
        except JobNotFound:  # deleted between listing and reading
            return None

    # -- change --------------------------------------------------------------------------------

    def update(self, job_id: str, change: Callable[[Job], Job]) -> Job:
        """Apply ``change`` to the current record by compare-and-swap; the record written.

        ``change`` gets the current job and returns the new one; it may run several times (once
        per lost race), so it must be pure. State changes inside it go through
        ``job.transition``; a state change that skipped it is checked here all the same.
        Exceptions from ``change`` (such as ``IllegalTransition``) propagate with nothing written.
        """
        for attempt in range(CAS_TRIES):
            current, etag = self._read(job_id)
            before = current.to_dict()
            new = change(current)
            after = new.to_dict()
            if after == before:
                return new
            if new.job_id != job_id or new.created_at != before["created_at"]:
                raise JobError(f"a change may not alter the identity of job {job_id}")
            if new.state.value != before["state"]:
                check_transition(JobState(before["state"]), new.state)
            after["updated_at"] = max(new.updated_at, time.time())
            moved = new.state is not current.state
            if moved:  # found in its new state's folder whatever happens next (module docstring)
                self._index(job_id, new.state)
            try:
                storage.write_bytes(self._job_uri(job_id), _encode(after), if_match=etag)
            except NotFoundError as exc:
                raise JobNotFound(f"no such job: {job_id}") from exc
            except PreconditionFailed:  # somebody else wrote first: re-read and re-apply
                time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
                continue
            if moved:
                self._index(job_id, new.state)  # again, in case a reader removed it meanwhile
                self._unindex(job_id, current.state)
            return Job.from_dict(after)
        raise JobError(f"gave up changing job {job_id} after {CAS_TRIES} conflicting writes")

    def claim(self, job_id: str, ray_job_id: str, *, ray_address: str | None = None) -> Job | None:
        """Move a QUEUED job to RUNNING for ``ray_job_id`` (to be submitted to the Jobs API at
        ``ray_address``, if given); None if it is not claimable.

        Of several racing claims exactly one gets the job. A QUEUED job whose cancel was
        requested (a requeued run) is moved to CANCELLED instead, and None returned.
        """

        def change(job: Job) -> Job:
            if job.state is JobState.QUEUED and job.cancel_requested:
                return transition(job, JobState.CANCELLED)
            running = transition(job, JobState.RUNNING)
            running.ray_job_id = ray_job_id
            if ray_address is not None:
                running.ray_address = ray_address
            return running

        try:
            job = self.update(job_id, change)
        except IllegalTransition:
            return None
        return job if job.state is JobState.RUNNING and job.ray_job_id == ray_job_id else None

    def request_cancel(self, job_id: str) -> Job:
        """Cancel: a QUEUED job becomes CANCELLED at once; a RUNNING one gets
        ``cancel_requested`` and its runner moves it to CANCELLED. A finished job is unchanged.
        """

        def change(job: Job) -> Job:
            if job.state is JobState.QUEUED:
                cancelled = transition(job, JobState.CANCELLED)
                cancelled.cancel_requested = True
                return cancelled
            if job.state is JobState.RUNNING:
                job.cancel_requested = True
            return job

        return self.update(job_id, change)

    def record_progress(
        self,
        job_id: str,
        rows_done: int,
        rows_failed: int,
        rows_total: int | None = None,
        *,
        ray_job_id: str | None = None,
        images_per_s: float | None = None,
        runner: dict[str, Any] | None = None,
        waiting: str | None = None,
    ) -> Job:
        """Store a RUNNING job's row counts; the record (its runner reads ``cancel_requested``).

        Ignored (record returned unchanged) when the job is not RUNNING, or, with ``ray_job_id``,
        when it runs under another attempt: a stale runner cannot overwrite a newer one.
        """

        def change(job: Job) -> Job:
            if job.state is not JobState.RUNNING:
                return job
            if ray_job_id is not None and job.ray_job_id != ray_job_id:
                return job
            job.rows_done, job.rows_failed = rows_done, rows_failed
            if rows_total is not None:
                job.rows_total = rows_total
            if images_per_s is not None:
                job.images_per_s = round(images_per_s, 2)
            if runner is not None:
                job.runner = runner
            job.waiting = waiting
            return job

        return self.update(job_id, change)

    # -- history ---------------------------------------------------------------------------------

    def prune(self, older_than_s: float, *, dry_run: bool = False,
              now: float | None = None) -> builtins.list[Job]:
        """Remove finished jobs that ended more than ``older_than_s`` ago; the jobs removed.

        Only records go (with their idempotency key and index entry): outputs are never
        touched. Index entries whose record is gone or in another state are removed too.
        """
        cutoff = (time.time() if now is None else now) - older_than_s
        finished = {s for s in JobState if s.terminal}
        old = [j for j in self.list(finished) if (j.ended_at or j.updated_at) < cutoff]
        if dry_run:
            return old
        for job in old:
            key = job.spec.idempotency_key
            if key is not None and self._key_names(key, job.job_id):
                storage.delete(self._key_uri(key))
            storage.delete(self._job_uri(job.job_id))
            self._unindex(job.job_id, job.state)
        self._sweep_index()
        return old

    def _key_names(self, idempotency_key: str, job_id: str) -> bool:
        try:
            entry = _decode(storage.read_bytes(self._key_uri(idempotency_key)), idempotency_key)
        except NotFoundError:
            return False
        return entry.get("job_id") == job_id

    def _sweep_index(self) -> None:
        """Remove index entries that disagree with their records (a writer died between writes).

        A writer that moves a job indexes the new state again after its record changed, so an
        entry removed here while its writer was between the two writes comes back.
        """
        for state in JobState:
            folder = storage.join(self.root, "state", state.value)
            ids = [n for n in storage.list_names(folder) if _JOB_ID.match(n)]
            current = {j.job_id: j.state for j in self._read_many(ids)}
            for job_id in ids:
                if current.get(job_id) is not state:
                    self._unindex(job_id, state)

    # -- the dispatcher's lease ----------------------------------------------------------------

    def acquire_lease(
        self, owner: str, ttl_s: float, holder_gone: Callable[[str], bool] | None = None
    ) -> bool:
        """Become (or stay) the one active dispatcher of this store for ``ttl_s`` seconds.

        True if ``owner`` holds the lease now: it was free, expired, already ``owner``'s, or
        its holder is known to be dead (``holder_gone``). Two dispatchers racing for the lease
        cannot both win (conditional writes).
        """
        uri = storage.join(self.root, "dispatcher.json")
        now = time.time()
        record = _encode({"owner": owner, "expires_at": now + ttl_s, "renewed_at": now})
        try:
            raw, etag = storage.read_with_etag(uri)
        except NotFoundError:
            try:
                storage.write_bytes(uri, record, if_none_match=True)
                return True
            except PreconditionFailed:
                return False
        current = _decode(raw, uri)
        holder = str(current.get("owner"))
        alive = float(current.get("expires_at", 0)) > now and not (holder_gone and holder_gone(holder))
        if holder != owner and alive:
            return False
        try:
            storage.write_bytes(uri, record, if_match=etag)
            return True
        except (PreconditionFailed, NotFoundError):
            return False

    def lease_holder(self) -> str | None:
        """The owner of an unexpired dispatcher lease, if any."""
        uri = storage.join(self.root, "dispatcher.json")
        try:
            current = _decode(storage.read_bytes(uri), uri)
        except NotFoundError:
            return None
        return current.get("owner") if float(current.get("expires_at", 0)) > time.time() else None

    def release_lease(self, owner: str) -> None:
        if self.lease_holder() == owner:
            storage.delete(storage.join(self.root, "dispatcher.json"))

    # -- the embedded default's local Ray head -------------------------------------------------

    def local_head(self) -> dict[str, Any] | None:
        """The record of the local Ray head the lease holder runs for this store, if any."""
        uri = storage.join(self.root, "local-head.json")
        try:
            return _decode(storage.read_bytes(uri), uri)
        except NotFoundError:
            return None

    def remember_local_head(self, record: dict[str, Any]) -> None:
        storage.write_bytes(storage.join(self.root, "local-head.json"), _encode(record))

    def forget_local_head(self) -> None:
        storage.delete(storage.join(self.root, "local-head.json"))


__all__ = ["CAS_TRIES", "JobStore", "default_store_uri"]
