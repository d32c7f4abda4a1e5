"""The library client: submit, follow, cancel and resume jobs from Python, as ``batchinf`` does.

The command line is a thin layer over this class (it parses, prints and picks exit codes), so
an Airflow task, a notebook or a cron wrapper gets the same queue without a subprocess::

    from batchinf.client import Client

    client = Client()  # the store of BATCHINF_STORE, else ~/.batchinf; address=... for a cluster
    job = client.submit("images.csv", model="models/digits", output="out/", wait=True)
    if job.state.value != "SUCCEEDED":
        raise SystemExit(f"{job.job_id} {job.state.value}: {job.error}")
    print(job.summary["rows_ok"], "rows scored; Parquet in", job.spec.output)

    later = client.submit("jobs/nightly.yaml")  # queued; follow it from anywhere by its id
    print(client.wait(later.job_id, timeout=3600).state)

Where a job runs follows the command's rules:

- with ``address`` (a cluster's Jobs API, ``http://head:8265``) the job is queued and the
  cluster's dispatcher runs it; ``wait`` follows its record;
- with no address and no ``wait``, it is queued and a local dispatcher (with its own local
  Ray head) is started in the background, unless one serves the store already;
- with no address and ``wait``, it runs in this process ("run here"): on the store's running
  local head if there is one, else on a local Ray started for this run. Such a job is created
  already held by this process (RUNNING as ``local-<job>-a1``), so no dispatcher can take it.
  Only when a dispatcher is starting up for the store (its head not running yet) is the job
  left to it and followed; ``run_here=True`` runs it here all the same.

Progress goes to ``on_progress``: a ``Progress`` from the pipeline while the job runs here, a
``Snapshot`` of the record while it is followed; both have ``rows_total``, ``rows_done``,
``rows_failed``, ``images_per_s``, ``eta_s`` and ``waiting``. Every error is a
``batchinf.errors.BatchinfError``; nothing here prints. TensorFlow and Ray are imported only
when a job runs here.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchinf.errors import BatchinfError, JobError, UsageError
from batchinf.job import Job, JobSpec, JobState, local_run_id, ran_here, transition
from batchinf.jobstore import JobStore
from batchinf.settings import SettingError, Settings

if TYPE_CHECKING:
    import pyarrow

    from batchinf.display import Snapshot
    from batchinf.progress import Progress
    from batchinf.raycluster import LocalHead

    ProgressCallback = Callable[[Progress | Snapshot], None]

RetryCallback = Callable[[Job], None]  # gets the requeued record before the wait for its retry
CANCEL_WAIT_S = 120.0
DISPATCHER_IDLE_EXIT_S = 60  # a dispatcher started on demand exits after this long with no job


@dataclass(frozen=True)
class Submitted:
    """A job just submitted, and what ``Client.finish`` will do with it."""

    job: Job  # the record as created (or the idempotency key's earlier job)
    created: bool  # False: the idempotency key had been used; ``job`` is that key's job
    runs_here: bool  # this process holds the job: ``finish`` runs it here, not follows it
    head: LocalHead | None = None  # the store's running local head a run here joins, if any


class Client:
    """Jobs of one store, run on a cluster (``address``) or on this machine (the default)."""

    def __init__(
        self,
        store: str | None = None,
        address: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        try:
            self.settings = settings if settings is not None else Settings.from_env()
        except SettingError as exc:  # a mistyped BATCHINF_* variable is a bad option
            raise UsageError(str(exc)) from exc
        self.store = JobStore.from_uri(store or self.settings.store_uri)
        self.address = None if address in (None, "", "local") else address

    def __repr__(self) -> str:
        return f"Client(store={self.store.root!r}, address={self.address!r})"

    # -- submit ----------------------------------------------------------------------------------

    def submit(
        self,
        source: str | JobSpec,
        *,
        wait: bool = False,
        run_here: bool | None = None,
        date: str | None = None,
        on_progress: ProgressCallback | None = None,
        on_retry: RetryCallback | None = None,
        **options: Any,
    ) -> Job:
        """Submit a job; its record: as queued, or (``wait`` or ``run_here``) as it ended.

        ``source`` is a ``JobSpec``, or what ``build_spec`` takes (a manifest, a folder or
        s3:// prefix, or a job spec file) with ``options`` (``model=``, ``output=``,
        ``top_k=``, ``replicas="1:4"``, ``outputs=["embedding"]``, ... as ``batchinf submit``
        names them) and ``date``.
        ``run_here``: True runs the job in this process whatever else serves the store, False
        leaves it to a dispatcher; None decides as the module docstring says.
        """
        if isinstance(source, JobSpec):
            if options or date is not None:
                raise UsageError("give options either in the JobSpec or as keywords, not both")
            spec = source
        else:
            spec = self.build_spec(source, date=date, **options)
        submitted = self.enqueue(spec, wait=wait or bool(run_here), run_here=run_here)
        if not (wait or run_here):
            return submitted.job
        return self.finish(submitted, on_progress, on_retry)

    def build_spec(self, source: str, *, date: str | None = None, **options: Any) -> JobSpec:
        """A checked ``JobSpec`` from a manifest and options, or from a job spec file
        (``jobs/*.yaml``) with options over its own; options that are None are left out.
        Local paths are made absolute, so the job means the same thing from any folder."""
        from batchinf import jobfile

        values: dict[str, Any] = {"manifest": source}
        if jobfile.is_spec(source):
            values = jobfile.job_options(jobfile.load(source, jobfile.parse_date(date)))
        elif date is not None:
            raise UsageError("--date applies to a job spec (jobs/*.yaml), not to a manifest")
        values.update({k: v for k, v in options.items() if v is not None})
        for option in ("manifest", "model", "output"):
            if not values.get(option):
                raise UsageError(f"missing --{option}: give it on the command line or in the job spec")
        low, high = parse_replicas(values.pop("replicas", 1))
        if "outputs" in values:
            values["outputs"] = parse_outputs(values["outputs"])
        if "memory_per_replica" in values:
            values["memory_per_replica"] = parse_size(values["memory_per_replica"])
        if values.get("incremental") and not values.get("name") and values.get("idempotency_key"):
            values["name"] = key_name(str(values["idempotency_key"]))
        for option in ("manifest", "model", "output", "challenger"):
            if values.get(option):
                values[option] = absolute_uri(str(values[option]))
        try:
            spec = JobSpec(replicas_min=low, replicas_max=high, **values)
        except TypeError as exc:
            raise UsageError(f"bad job spec value: {exc}") from exc
        spec.validate()
        return spec

    def check(self, spec: JobSpec) -> None:
        """Fail now, in one line, on what the job would fail on at once: a manifest that cannot
        be read (a cron typo), a model it cannot feed, and, for a job run on this machine with
        its files and credentials, an output it cannot write."""
        from batchinf import storage
        from batchinf.manifest import check
        from batchinf.model import resolve_model
        from batchinf.signature import inspect

        spec.check_columns(check(spec.manifest, spec.include))
        inspect(resolve_model(spec.model, spec.model_version), spec.outputs, ranks=spec.top_k > 0)
        if spec.challenger:  # the challenger is ranked too: it needs its class output and labels
            inspect(resolve_model(spec.challenger, spec.challenger_version))
        if self.address is None:
            storage.check_writable(spec.output, "_batchinf-write-check-submit")

    def enqueue(
        self, spec: JobSpec, *, wait: bool = False, run_here: bool | None = None
    ) -> Submitted:
        """Check and create the job; held by this process if it will run it (``finish`` does),
        else left to a dispatcher, which is woken or started. The first half of ``submit``,
        for a caller that says something between the two (the CLI, the demo)."""
        self.check(spec)
        head, here = self._where(wait or bool(run_here), run_here)
        job, created = self.store.create(spec, runner=this_process() if here else None)
        here = here and created and job.ray_job_id == local_run_id(job.job_id, 1)
        if not here and not job.state.terminal:  # (an idempotency key's finished job: nothing to run)
            self._ensure_dispatcher()
        return Submitted(job, created, here, head if here else None)

    def finish(
        self,
        submitted: Submitted,
        on_progress: ProgressCallback | None = None,
        on_retry: RetryCallback | None = None,
    ) -> Job:
        """Run a job ``enqueue`` held for this process, or follow it; its final record."""
        job = submitted.job
        if submitted.runs_here and job.ray_job_id is not None:
            return self._run(job.job_id, job.ray_job_id, submitted.head, on_progress, on_retry)
        return self.wait(job.job_id, on_progress)

    # -- follow, cancel, resume ------------------------------------------------------------------

    def status(self, job_id: str) -> Job:
        """The job's current record (``JobNotFound`` if there is none)."""
        return self.store.get(job_id)

    def wait(
        self,
        job_id: str,
        on_progress: ProgressCallback | None = None,
        *,
        timeout: float | None = None,
        poll_s: float = 1.0,
    ) -> Job:
        """Follow a job that runs elsewhere, from its record, until it ends (or ``timeout``
        seconds pass: then the record as it is, which ``job.state.terminal`` tells apart)."""
        from batchinf.display import Snapshot

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.store.get(job_id)
            if on_progress is not None:
                on_progress(Snapshot(job.rows_total, job.rows_done, job.rows_failed,
                                     job.images_per_s or 0.0, waiting=waiting_line(job)))
            if job.state.terminal or (deadline is not None and time.monotonic() >= deadline):
                return job
            time.sleep(poll_s)

    def cancel(self, job_id: str, *, wait: bool = True, timeout: float = CANCEL_WAIT_S) -> Job:
        """Cancel a job: a queued one at once, a running one within seconds (no ``_SUCCESS``).
        With ``wait``, returns once it ended or ``timeout`` passed; else once requested."""
        job = self.store.request_cancel(job_id)
        deadline = time.monotonic() + timeout
        while wait and not job.state.terminal and time.monotonic() < deadline:
            time.sleep(0.5)
            job = self.store.get(job_id)
        return job

    def resume(
        self,
        job_id: str,
        *,
        wait: bool = False,
        run_here: bool | None = None,
        on_progress: ProgressCallback | None = None,
        on_retry: RetryCallback | None = None,
    ) -> Job:
        """Queue a FAILED, CANCELLED or orphaned RUNNING job again (``UsageError`` for any
        other); it redoes only uncommitted shards. Where it runs: as ``submit`` decides."""
        job = self.store.update(job_id, _requeue)
        head, here = self._where(wait or bool(run_here), run_here)
        if not here:
            self._ensure_dispatcher()
            return self.wait(job_id, on_progress) if wait else job
        return self._run(job_id, self._claim(job_id), head, on_progress, on_retry)

    def run_here(
        self,
        job_id: str,
        on_progress: ProgressCallback | None = None,
        on_retry: RetryCallback | None = None,
    ) -> Job:
        """Run a QUEUED job in this process to its end, on the store's running local head if
        there is one, else on a local Ray of its own; a job a dispatcher took first is
        followed instead. Its final record."""
        head, _ = self._where(True, True)
        return self._run(job_id, self._claim(job_id), head, on_progress, on_retry)

    # -- history ---------------------------------------------------------------------------------

    def jobs(
        self, states: set[JobState] | None = None, *, limit: int = 50, before: str | None = None
    ) -> tuple[list[Job], str | None]:
        """A page of jobs (in ``states``), newest first, and the id to pass as ``before`` for
        the next page (None on the last)."""
        return self.store.page(states, limit=limit, before=before)

    def latest(self, name: str) -> pyarrow.Table:
        """The newest prediction of every URI across all nights of the spec ``name``."""
        from batchinf.ledger import Ledger

        return Ledger(self.store.root, name).latest()

    def logs(self, job_id: str) -> str:
        """The log of the job's current (or last) Ray job."""
        from batchinf.raycluster import jobs_client

        job = self.store.get(job_id)
        target = self.address or job.ray_address
        if not job.ray_job_id or ran_here(job.ray_job_id) or not target:
            raise UsageError(f"job {job_id} ran in-process (submit --wait): its log went to that terminal")
        return str(jobs_client(target).get_job_logs(job.ray_job_id))

    # -- where a job runs ------------------------------------------------------------------------

    def _where(self, wait: bool, run_here: bool | None) -> tuple[LocalHead | None, bool]:
        """Whether this process runs the job, and the store's running local head it joins.

        Not without waiting, nor with a cluster address; else yes with ``run_here``, or when
        the store's local head runs (no Ray to start, no driver to launch), or when no
        dispatcher serves the store.
        """
        if not wait or run_here is False:
            return None, False
        if self.address is not None:
            if run_here:
                raise UsageError("run_here runs the job on this machine's Ray: give no cluster address")
            return None, False
        from batchinf.raycluster import running_head

        head = running_head(self.store)
        if head is not None or run_here:
            return head, True
        return None, self._live_dispatcher() is None

    def _live_dispatcher(self) -> str | None:
        """The owner (``host:pid``) of the store's lease, unless it is known to be dead."""
        from batchinf.dispatcher import holder_is_gone

        holder = self.store.lease_holder()
        return holder if holder is not None and not holder_is_gone(holder) else None

    def _ensure_dispatcher(self) -> None:
        """See that a dispatcher takes the queued job: a cluster's runs whenever it runs; a
        live local one is woken now (not at its next poll); else one is started in the
        background, with its own local Ray head, to exit after a minute with nothing to do."""
        if self.address is not None:
            return
        from batchinf.dispatcher import nudge

        holder = self._live_dispatcher()
        if holder is not None:
            nudge(holder)
            return
        log_path = os.path.join(os.path.expanduser("~"), ".batchinf-dispatcher.log")
        with open(log_path, "ab") as log:
            subprocess.Popen(
                [sys.executable, "-m", "batchinf.cli", "dispatcher", "--store", self.store.root,
                 "--idle-exit", str(DISPATCHER_IDLE_EXIT_S)],
                env={**os.environ, **self.settings.as_env()},
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )

    def _claim(self, job_id: str) -> str | None:
        """Claim a QUEUED job for the next in-process attempt; its run id, or None if it is
        not claimable (a dispatcher or a cancel got there first)."""
        run_id = local_run_id(job_id, self.store.get(job_id).attempt + 1)
        return run_id if self.store.claim(job_id, run_id) is not None else None

    def _run(
        self,
        job_id: str,
        run_id: str | None,
        head: LocalHead | None,
        on_progress: ProgressCallback | None,
        on_retry: RetryCallback | None,
    ) -> Job:
        """Run the attempt held as ``run_id`` here, and each retry of it, to the job's end.

        An attempt the infrastructure ended is run again here after its back-off, unless a
        dispatcher took the job over meanwhile (then its record is followed).
        """
        from batchinf.attempt import abandon, run_claimed

        while run_id is not None:
            try:
                self._join(head)
            except BatchinfError as exc:
                abandon(self.store, job_id, run_id, exc, self.settings)
                raise
            try:
                job = run_claimed(self.store, job_id, run_id, on_progress, self.settings)
            except JobError:  # taken over meanwhile
                break
            if job.state is not JobState.QUEUED:
                return job
            if on_retry is not None:
                on_retry(job)
            time.sleep(max(0.0, (job.retry_at or 0) - time.time()))
            run_id = self._claim(job_id)
        return self.wait(job_id, on_progress)

    @staticmethod
    def _join(head: LocalHead | None) -> None:
        """Connect this process to the store's running local head (with its token auth, as
        its drivers have), or start a local Ray for this run alone (without the dashboard,
        which would end with it)."""
        from batchinf.raycluster import ensure_ray

        if head is None:
            ensure_ray("local", dashboard=False)
            return
        mode = head.auth_mode()
        if mode and not os.environ.get("RAY_AUTH_MODE"):
            os.environ["RAY_AUTH_MODE"] = mode
        ensure_ray(head.gcs_address)


def _requeue(job: Job) -> Job:
    """A resumed job: QUEUED again if it ended FAILED or CANCELLED or its runner is gone."""
    from batchinf.attempt import runner_is_gone

    if job.state in (JobState.FAILED, JobState.CANCELLED):
        return transition(job, JobState.QUEUED)
    if job.state is JobState.RUNNING and runner_is_gone(job):
        return transition(job, JobState.QUEUED)
    if job.state is JobState.QUEUED:
        return job
    raise UsageError(f"job {job.job_id} is {job.state.value}; only FAILED, CANCELLED or "
                     "orphaned RUNNING jobs can be resumed")


def this_process() -> dict[str, Any]:
    """This process as a job's runner (``{"host", "pid"}``), so a dead one can be told apart."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def waiting_line(job: Job) -> str | None:
    """What a job waits for, as a person would want it said (None when it is moving)."""
    if job.state is JobState.QUEUED:
        wait_s = (job.retry_at or 0) - time.time()
        if job.launch_error:
            when = f"retry in {wait_s:.0f} s" if wait_s > 0 else "retrying now"
            return f"launch refused by the cluster: {job.launch_error}; {when}"
        if wait_s > 0:
            return f"queued: attempt {job.attempt + 1} starts in {wait_s:.0f} s"
        return "queued: waiting for a dispatcher and a free slot"
    return job.waiting


def parse_replicas(value: int | str | tuple[int, int]) -> tuple[int, int]:
    """``N``, ``"N"``, ``"MIN:MAX"`` or ``(MIN, MAX)`` -> (min, max)."""
    if isinstance(value, tuple | list) and len(value) == 2:
        value = f"{value[0]}:{value[1]}"
    text = str(value)
    low, _, high = text.partition(":")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError as exc:
        raise UsageError(f"--replicas takes N or MIN:MAX, got {text!r}") from exc
    if not 1 <= lo <= hi:
        raise UsageError(f"--replicas needs 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6,
               "mib": 2**20, "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12,
               "tib": 2**40}


def parse_size(value: str | int | float, option: str = "--memory-per-replica") -> float:
    """``"2GiB"``, ``"1500MiB"``, ``"2G"``, ``"800mb"`` or a number of bytes -> bytes."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise UsageError(f"{option} takes a size such as 2GiB, 1500MiB or 3G, got {value!r}")
    return float(match.group(1)) * _SIZE_UNITS[unit]


def parse_outputs(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a,b"``, ``["a", "b"]`` or ``("a", "b")`` -> ``["a", "b"]``: the outputs to write."""
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    if isinstance(value, list | tuple) and all(isinstance(name, str) for name in value):
        return [name.strip() for name in value]
    raise UsageError(f"--outputs takes output names, NAME[,NAME], got {value!r}")


def key_name(idempotency_key: str) -> str:
    """The name an idempotency key gives its nights: the key less a trailing ``-YYYY-MM-DD``
    (``nightly-2026-11-21`` -> ``nightly``)."""
    return re.sub(r"-\d{4}-\d{2}-\d{2}$", "", idempotency_key) or idempotency_key


def absolute_uri(uri: str) -> str:
    """Local paths are stored absolute, so a job means the same thing from any folder."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)


__all__ = ["Client", "Submitted", "absolute_uri", "key_name", "parse_outputs", "parse_replicas",
           "waiting_line"]
