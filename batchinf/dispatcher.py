"""The dispatcher: the long-lived loop on a cluster's head that turns QUEUED jobs into Ray jobs.

Each round it
1. reconciles: a RUNNING job whose Ray job has ended or vanished (driver killed, cluster
   restarted) without recording an end is requeued, to resume from its committed parts; after
   ``MAX_ATTEMPTS`` such crashes it fails instead, so a job that always crashes stops;
2. enforces cancels: a RUNNING job whose cancel its runner has not honoured within
   ``CANCEL_GRACE_S`` has its Ray job stopped;
3. launches QUEUED jobs, highest priority first, then oldest, while fewer than
   ``max_running`` run. It claims a job (QUEUED -> RUNNING, which only one dispatcher can win)
   before submitting its Ray job with a readable submission id, ``<job_id>-a<attempt>``;
   a dispatcher that dies between the two leaves a RUNNING job with no Ray job, which the next
   round requeues. A launch the cluster refuses (the Jobs API answers an error) puts the job
   back in the queue with a doubling back-off and the reason in its record, and fails it after
   ``BATCHINF_LAUNCH_REFUSALS`` refusals in a row; a submission that landed although its
   answer was lost is found by its id and adopted. Each Ray job gets the dispatcher's own
   settings (those that differ from the defaults, secrets left out) as its environment.

A round reads only the QUEUED and RUNNING jobs (the store's state index), and the lease is
renewed every third of its time, so an idle dispatcher costs a few store requests a round
however much history the store holds.

The store holds all state, so a dispatcher can be restarted at any time, and a job submitted
while no cluster runs simply waits as QUEUED. A lease in the store keeps one dispatcher active
per store. Without a cluster address (the embedded default) the dispatcher that holds the lease
runs the store's one local Ray head: it adopts the head a dead predecessor left running, or
starts one, and stops it when it exits.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from batchinf.job import (
    MAX_ATTEMPTS,
    Job,
    JobState,
    fail,
    ran_here,
    refuse_launch,
    retry_delay,
    retry_later,
    transition,
)
from batchinf.jobstore import JobStore
from batchinf.raycluster import adopt_or_start, jobs_client, process_is_gone
from batchinf.settings import Settings

log = logging.getLogger("batchinf.dispatcher")

CANCEL_GRACE_S = 30.0
FINISHED_COUNT_EVERY_S = 60.0  # how often the metrics count finished jobs (listings of history)
_ENDED = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class Dispatcher:
    """One store, one Ray cluster: launch, watch and requeue jobs."""

    store: JobStore
    address: str | None  # None: run the store's own local Ray head (embedded default)
    max_running: int = 2
    python: str = sys.executable
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    metrics_port: int | None = None  # serve batchinf_jobs (queue depth) for Prometheus here
    # Read once when the dispatcher starts; passed on to every job it launches.
    settings: Settings = field(default_factory=Settings.from_env)

    def __post_init__(self) -> None:
        self.head: Any = None
        self.active = 0  # QUEUED and RUNNING jobs after the last round
        self._queue_gauge: Any = None
        self._finished_counted_at = float("-inf")
        self._lease_until = 0.0  # our lease is ours at least until then (monotonic)
        self.client: Any = jobs_client(self.address) if self.address else None

    def connect(self) -> None:
        """Embedded default: adopt the local head a dead dispatcher left, or start one."""
        if self.client is not None:
            return

        self.head = adopt_or_start(self.store)
        self.address = self.head.jobs_address
        self.client = jobs_client(self.address)
        log.info(
            "local Ray head: dashboard and Jobs API at %s (token: %s)",
            self.address, self.head.token_hint(),
        )

    def ray_status(self, ray_job_id: str) -> str | None:
        """The Ray job's status name, or None if Ray does not know it."""
        try:
            return str(getattr(self.client.get_job_status(ray_job_id), "value", "")) or None
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return None
            raise

    def tick(self) -> list[str]:
        """One round: reconcile, enforce cancels, launch; the Ray job ids launched.

        It reads the QUEUED and RUNNING jobs only (through the store's state index), so an idle
        round costs the same few requests whatever the number of finished jobs.
        """
        active = self.store.list({JobState.QUEUED, JobState.RUNNING})
        self._export_queue(active)
        active = [self._reconcile(j) if j.state is JobState.RUNNING else j for j in active]
        self.active = sum(1 for j in active if not j.state.terminal)
        running = sum(1 for j in active if j.state is JobState.RUNNING)
        now = time.time()
        queued = sorted(
            (j for j in active if j.state is JobState.QUEUED and (j.retry_at or 0) <= now),
            key=lambda j: (-j.spec.priority, j.created_at),
        )
        launched = []
        for job in queued[: max(0, self.max_running - running)]:
            ray_job_id = self._launch(job)
            if ray_job_id:
                launched.append(ray_job_id)
        return launched

    def _export_queue(self, active: list[Job]) -> None:
        """Queue depth by state, on ``metrics_port`` for Prometheus (the dispatcher is no Ray
        driver: joining the cluster would list it on the dashboard's Jobs page). Finished
        states are counted from the index's listings, at most once a minute."""
        if self.metrics_port is None:
            return
        if self._queue_gauge is None:
            from prometheus_client import CollectorRegistry, Gauge, start_http_server

            registry = CollectorRegistry()
            self._queue_gauge = Gauge("batchinf_jobs", "Jobs in the store, by state.",
                                      ["state"], registry=registry)
            start_http_server(self.metrics_port, addr="127.0.0.1", registry=registry)
        for state in (JobState.QUEUED, JobState.RUNNING):
            self._queue_gauge.labels(state=state.value).set(
                sum(1 for j in active if j.state is state)
            )
        if time.monotonic() - self._finished_counted_at >= FINISHED_COUNT_EVERY_S:
            self._finished_counted_at = time.monotonic()
            for state in (s for s in JobState if s.terminal):
                self._queue_gauge.labels(state=state.value).set(len(self.store.ids_in({state})))

    def _reconcile(self, job: Job) -> Job:
        """A RUNNING job's record set right if its Ray job has ended; the record as it is now."""
        if not job.ray_job_id or ran_here(job.ray_job_id):
            return job  # run in-process by `submit --wait`; `resume` handles those
        status = self.ray_status(job.ray_job_id)
        if status is not None and status not in _ENDED:
            if job.cancel_requested and time.time() - job.updated_at > CANCEL_GRACE_S:
                self.client.stop_job(job.ray_job_id)
            return job
        stale_id = job.ray_job_id

        def requeue(current: Job) -> Job:
            if current.state is not JobState.RUNNING or current.ray_job_id != stale_id:
                return current
            if current.cancel_requested:
                return transition(current, JobState.CANCELLED)
            reason = f"its Ray job {stale_id} ended as {status or 'gone'} (driver or its node lost)"
            if current.attempt >= MAX_ATTEMPTS:
                return fail(current, "Crashed", f"{reason}, {current.attempt} attempts")
            return retry_later(current, reason, retry_delay(current.attempt, self.settings))

        after = self.store.update(job.job_id, requeue)
        log.warning("job %s: Ray job %s is %s; now %s", job.job_id, stale_id, status, after.state)
        return after

    def _launch(self, job: Job) -> str | None:
        ray_job_id = f"{job.job_id}-a{job.attempt + 1}"
        claimed = self.store.claim(job.job_id, ray_job_id, ray_address=self.address)
        if claimed is None:
            return None  # another dispatcher or a cancel got there first
        entrypoint = shlex.join(
            [self.python, "-m", "batchinf.cli", "run", job.job_id, "--run-id", ray_job_id,
             "--store", self.store.root]
        )
        env = self.settings.as_env()
        try:
            self.client.submit_job(
                entrypoint=entrypoint,
                submission_id=ray_job_id,
                metadata={"batchinf_job_id": job.job_id, "attempt": str(claimed.attempt)},
                runtime_env={"env_vars": env} if env else None,
            )
        except Exception as exc:
            if not self._ours_already(job.job_id, ray_job_id):
                self._refused(job.job_id, ray_job_id, exc)
                return None
            log.info("job %s: Ray job %s exists already (an earlier answer was lost); adopted",
                     job.job_id, ray_job_id)
        if claimed.launch_refusals:
            self.store.update(job.job_id, _launch_taken)
        log.info("job %s: launched as Ray job %s", job.job_id, ray_job_id)
        return ray_job_id

    def _ours_already(self, job_id: str, ray_job_id: str) -> bool:
        """True when the cluster holds a Ray job ``ray_job_id`` that this job's attempt submitted
        (a submission whose answer was lost, or a refusal of an id that exists)."""
        try:
            info = self.client.get_job_info(ray_job_id)
        except Exception:  # it does not exist, or the cluster does not answer either
            return False
        return (getattr(info, "metadata", None) or {}).get("batchinf_job_id") == job_id

    def _refused(self, job_id: str, ray_job_id: str, exc: Exception) -> None:
        """The cluster refused the launch: back off and queue again, or fail after too many."""
        reason = _one_line(exc)
        after = self.store.update(
            job_id, lambda j: refuse_launch(j, ray_job_id, reason, settings=self.settings))
        if after.state is JobState.FAILED:
            log.error("job %s: launch refused %d times; failed: %s", job_id,
                      after.launch_refusals, reason)
        else:
            log.warning("job %s: launch refused by the cluster (%s); retry in %.0f s", job_id,
                        reason, max(0.0, (after.retry_at or 0) - time.time()))
        return None

    def _hold_lease(self, ttl_s: float) -> bool:
        """Hold the store's lease, renewing it once a third of its time has passed (not every
        round: a renewal is two requests)."""
        if time.monotonic() < self._lease_until:
            return True
        started = time.monotonic()
        if not self.store.acquire_lease(self.owner, ttl_s=ttl_s, holder_gone=holder_is_gone):
            return False
        self._lease_until = started + ttl_s / 3
        return True

    def serve(self, poll_s: float = 2.0, idle_exit_s: float | None = None) -> str:
        """Run rounds until a signal, or idle for ``idle_exit_s``; hold the store's lease.

        Returns (and logs) why it stopped. A local head it runs is stopped on the way out.
        """
        stop = _StopOnSignal()
        idle_since = time.monotonic()
        holder: str | None = None
        reason = "error"
        try:
            while not stop.signal:
                if self._hold_lease(ttl_s=max(30.0, 10 * poll_s)):
                    holder = None
                    self.connect()
                    self.tick()
                    if self.active:
                        idle_since = time.monotonic()
                else:
                    current = self.store.lease_holder()
                    if idle_exit_s is not None and current is not None:
                        reason = f"dispatcher {current} already serves {self.store.root}"
                        break  # an on-demand dispatcher: the live one does the work
                    if current != holder:  # say it once, and again only when it changes
                        log.info("dispatcher %s holds the lease for %s; waiting", current,
                                 self.store.root)
                        holder = current
                if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    reason = f"idle for {idle_exit_s:.0f} s"
                    break
                stop.sleep(poll_s)
            else:
                reason = f"signal {stop.signal}"
        finally:
            stop.restore()
            if self.head is not None:  # stop the head before another dispatcher may adopt it
                self.head.stop()
                self.store.forget_local_head()
            self.store.release_lease(self.owner)
        log.info("dispatcher %s exits: %s", self.owner, reason)
        return reason


def _launch_taken(job: Job) -> Job:
    job.launch_refusals, job.launch_error = 0, None
    return job


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line, for a record and a status line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def nudge(owner: str) -> bool:
    """Wake the dispatcher ``owner`` (``host:pid``) for its next round now, not at its next
    poll, when it runs on this host; True if it was woken. The process is checked to be a
    batchinf dispatcher first: SIGUSR1 would end any other process."""
    import psutil

    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        process = psutil.Process(int(pid))
        args = process.cmdline()
        if "dispatcher" not in args or not any("batchinf" in arg for arg in args):
            return False
        process.send_signal(signal.SIGUSR1)
    except (psutil.Error, OSError):
        return False
    return True


def holder_is_gone(owner: str) -> bool:
    """True when a lease ``owner`` (``host:pid``) is a process on this host that has exited."""

    host, _, pid = owner.rpartition(":")
    return pid.isdigit() and process_is_gone(host, int(pid))


class _StopOnSignal:
    """SIGTERM and SIGINT end the loop cleanly, so the local head is stopped too. SIGUSR1
    (``nudge``: a job was just submitted on this machine) ends the current wait at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._woken = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                continue

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR1:
            self._woken = True
            return
        self.signal = signal.Signals(signum).name

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.signal and not self._woken and time.monotonic() < deadline:
            time.sleep(min(0.05, seconds))
        self._woken = False

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
