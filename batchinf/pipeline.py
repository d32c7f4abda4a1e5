"""Running one job on Ray: manifest -> fetch + decode tasks -> predictor actors -> parts.

    manifest shards ──► decode_batch tasks (CPU, threads for fetch) ──► predictor actors
        (streamed)       one per batch of rows                            (each holds the model)
                                                         │
    driver: collects each shard's batches ──► Parquet part committed atomically ──► _SUCCESS

Why Ray core and not Ray Data (docs/architecture.md has the measurements): the unit of
exactly-once is a shard's whole Parquet part, which Ray Data's writers do not give; a bad row
must become an error row, which Ray Data turns into an aborted dataset or a dropped block;
and the driver here plans resources so decode tasks always have a CPU, which is what made a
two-actor Ray Data pool hang on two CPUs.

Memory stays bounded: at most ``max_in_flight`` batches exist at once, the manifest is
streamed, and a shard's rows are dropped as soon as its part is committed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchinf import drift, manifest, metrics, report, sink, storage
from batchinf.access import ReadPolicy
from batchinf.decode import decode_batch
from batchinf.errors import (
    InfrastructureError,
    JobFailed,
    NotFoundError,
    PreconditionFailed,
    UsageError,
)
from batchinf.job import JobSpec, output_column
from batchinf.ledger import Ledger, Scored, shard_contents
from batchinf.manifest import Shard
from batchinf.model import ModelSource, replica_memory, resolve_model
from batchinf.planner import Plan
from batchinf.pool import PredictorPool
from batchinf.predictor import PredictedBatch
from batchinf.progress import Progress
from batchinf.settings import Settings
from batchinf.signature import inspect

INCREMENTAL = "_incremental.json"  # an incremental night's plan: the ledger files it skips by
BATCH_TRIES = 5  # sends of one batch before its loss ends the attempt as an infrastructure error


@dataclass
class JobResult:
    """How a run ended: its summary, and whether it was cancelled."""

    summary: dict[str, Any]
    cancelled: bool = False


@dataclass
class _ShardWork:
    shard: manifest.Shard
    results: list[PredictedBatch | None]
    waiting: int


@dataclass
class _Batch:
    work: _ShardWork
    number: int
    uris: list[str]
    actor: Any
    tries: int = 1
    sent_at: float = 0.0
    pixels: Any = None  # its decode task's result (a Ray object ref) until it is sent


class JobRunner:
    """Runs one job to its end (or cancel); commits one part per shard as shards finish."""

    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        baseline: drift.Baseline | None = None,
        ledger: Ledger | None = None,
        *,
        settings: Settings,
    ) -> None:
        spec.validate()
        self.job_id = job_id
        self.spec = spec
        self.settings = settings
        self._on_progress = on_progress or (lambda progress: None)
        self._should_stop = should_stop or (lambda: False)
        self._errors_by_kind: dict[str, int] = {}
        self._in_flight: dict[Any, _Batch] = {}
        self._open: list[_ShardWork] = []
        self._parts = 0
        self._first_part_s: float | None = None
        self._busy: list[float] = []
        self._redone = 0
        self._prefetched = 0
        self._generation = 0  # the pool's reservation that the decoding batches run in
        self._began = time.monotonic()
        self._began_at = time.time()  # wall clock, for the report's images/s over the run
        self._baseline = baseline
        self._stats: list[report.PartStats] = []
        self._ledger = ledger
        self._scored: Scored | None = None  # an incremental night: what earlier nights scored
        self._skipped = 0
        self._model_seconds = {"champion": 0.0, "challenger": 0.0}  # inside each model
        self._model_rows = {"champion": 0, "challenger": 0}  # rows each model scored

    def run(self) -> JobResult:
        import ray

        spec = self.spec
        source = resolve_model(spec.model, spec.model_version)
        # a model batchinf cannot feed, or wrong labels, or --outputs it lacks: no replica yet
        info = inspect(source, spec.outputs, ranks=spec.top_k > 0)
        challenger = (resolve_model(spec.challenger, spec.challenger_version)
                      if spec.challenger else None)
        second = inspect(challenger) if challenger else None
        # each model the replicas hold, with what it takes (pixels at its size, or files)
        fed = [(source, info.input)] + ([(challenger, second.input)] if challenger and second else [])
        self._rows = manifest.open_manifest(spec.manifest, spec.include, output=spec.output,
                                            job_id=self.job_id)
        columns = self._rows.check()
        spec.check_columns(columns)
        progress = Progress(rows_total=self._rows.count())  # None: a listing, known at its end
        storage.check_writable(spec.output, f"_batchinf-write-check-{self.job_id}")  # no work yet
        if self._ledger is not None:
            self._scored = self._plan_incremental(source)
        committed = sink.committed_parts(spec.output)
        if storage.exists(storage.join(spec.output, sink.SUCCESS)) and not committed:
            raise UsageError(f"output {spec.output} holds a finished result already")
        sink.check_output_owner(spec.output, self.job_id, committed)
        self._count_committed(committed, progress)
        self._run_info = sink.RunInfo(
            self.job_id, source.name, source.version, source.labels, info.ranks, info.outputs,
            sink.Challenger(challenger.name, challenger.version, challenger.labels)
            if challenger else None)
        self._challenger = challenger
        self._budget: int | None = None
        self._progress = progress
        self._known(progress.rows_total)
        self._on_progress(progress)  # rows_total is known before anything is placed (or None)
        if progress.rows_total == 0:  # a header-only manifest: no replica, an empty output
            sink.write_empty_part(spec.output, columns, self.job_id, self._rows.types, info.outputs,
                                  challenger is not None)
            summary = self._summary(source, columns, progress, None)
            self._report(summary)
            sink.write_success(spec.output, summary)
            return JobResult(summary)
        pool = PredictorPool(
            source, spec, self.job_id, on_wait=self._waiting, should_stop=self._should_stop,
            settings=self.settings, challenger=challenger,
            memory=spec.memory_per_replica or replica_memory(
                [(model, given.height * given.width) for model, given in fed], spec.batch_size),
        )
        try:
            reserved = pool.reserve()
            if reserved is None:  # cancelled while waiting for room
                return JobResult(self._summary(source, columns, progress, None), cancelled=True)
            pool.launch()  # the replicas load the model while the first batches decode
            task: Any = ray.remote(decode_batch)  # Ray's stubs know fewer arguments than it takes
            policy = ReadPolicy.from_settings(
                self.settings,
                tuple(spec.allowed_buckets) if spec.allowed_buckets is not None else None)
            decode_policy = self.settings.decode_policy

            def decode(uris: list[str]) -> Any:
                """A decode task in the pool's reservation of now (a replaced one's is gone)."""
                return task.options(**pool.decode_options()).remote(
                    uris, info.input, reserved.fetch_threads, reserved.decode_nice, policy,
                    decode_policy, second.input if second else None)

            self._decode = decode
            self._prefetch = _prefetch_batches(tuple(given for _, given in fed), spec.batch_size,
                                               reserved.max_in_flight,
                                               self.settings.prefetch_mb)
            cancelled = self._stream(pool, committed, progress)
            if not cancelled:  # a cancelled replica's queue may still hold batches: don't wait
                busy = pool.busy_by_replica()
                self._busy = list(busy.values())
                for number, seconds in busy.items():
                    metrics.replica_busy(self.job_id, number, seconds / max(progress.elapsed, 1e-9))
        finally:
            pool.stop()
        # The plan the job ended with: a lost node may have replaced the one it began with.
        summary = self._summary(source, columns, progress, pool.plan or reserved)
        if cancelled:
            return JobResult(summary, cancelled=True)
        self._check_budget(progress)
        self._report(summary)
        sink.write_success(spec.output, summary)
        return JobResult(summary)

    def _report(self, summary: dict[str, Any]) -> None:
        """Drift against the baseline (into the summary and the metrics), then the page."""
        from batchinf.reportpage import write_page

        if self._baseline is not None:
            summary["drift"] = drift.compare(summary, self._baseline, self.spec.max_drift_psi)
            drift.record(self.job_id, summary["drift"])
        write_page(storage.join(self.spec.output, report.PAGE), summary)

    def _waiting(self, reason: str | None) -> None:
        """The pool waits for resources (or stopped waiting): say so in the progress."""
        self._progress.waiting = reason
        self._on_progress(self._progress)

    def _stream(
        self, pool: PredictorPool, committed: dict[int, str], progress: Progress
    ) -> bool:
        """Send every batch of the shards not yet committed; True if the job was cancelled.

        A batch's decode task starts before a replica is free for it: while the replicas
        load the model, up to ``_prefetch`` batches are fetched and decoded, so the model
        is busy from its first second; after that, ``max_in_flight`` bounds the batches
        decoding or queued at replicas.
        """
        size = self.spec.batch_size
        self._last_batch = time.monotonic()
        self._decoded: collections.deque[_Batch] = collections.deque()
        for shard in self._rows.shards(self.spec.shard_size):
            self._known(self._rows.total)
            shard = self._new_rows(shard, progress)
            if shard.index in committed:
                continue
            if not len(shard):  # every row scored on an earlier night: an empty part
                empty = _ShardWork(shard, [], 0)
                self._open.append(empty)
                self._commit(empty)
                continue
            uris = [_resolve(self.spec.manifest, uri) for uri in shard.uris]
            starts = range(0, len(uris), size)
            work = _ShardWork(shard, [None] * len(starts), len(starts))
            self._open.append(work)
            for number, start in enumerate(starts):
                while not self._room(pool):
                    if self._collect(pool, progress):
                        return True
                batch = _Batch(work, number, uris[start : start + size], None)
                batch.pixels = self._decode(batch.uris)
                self._decoded.append(batch)
                self._prefetched += 0 if progress.processing else 1
                self._dispatch(pool, progress)
            if self._collect(pool, progress, wait=0.0):  # replicas ready, parts done: no waiting
                return True
        self._known(self._rows.total)  # a listing's rows are all known now
        while self._in_flight or self._decoded:
            if self._collect(pool, progress):
                return True
        return False

    def _known(self, total: int | None) -> None:
        """The rows in all, once known: the error budget follows from them. While a listing
        goes on there is no budget to spend (any share of an unknown total could be within
        it); the listed rows so far go to the progress instead."""
        progress = self._progress
        progress.rows_listed = getattr(self._rows, "listed", 0)
        if total is None or self._budget is not None:
            return
        progress.rows_total = total
        self._budget = math.floor(self.spec.max_error_rate * total)
        self._check_budget(progress)

    def _room(self, pool: PredictorPool) -> bool:
        """Whether another batch may start decoding now (not while the reservation that decode
        tasks run in is being replaced)."""
        if pool.replanning:
            return False
        if not self._progress.processing:
            return len(self._decoded) + len(self._in_flight) < self._prefetch
        return len(self._decoded) + len(self._in_flight) < pool.max_in_flight

    def _dispatch(self, pool: PredictorPool, progress: Progress) -> None:
        """Hand decoded (or decoding) batches to ready replicas, least busy first; the model
        work begins once ``replicas_min`` of them hold the model (``--replicas MIN:MAX``)."""
        if not progress.processing:
            if not pool.started:
                return
            progress.begin_processing()
        while self._decoded and pool.pick() is not None and (
            len(self._in_flight) < pool.max_in_flight
        ):
            self._send(pool, self._decoded.popleft())

    def _send(self, pool: PredictorPool, batch: _Batch) -> None:
        """Hand a batch to the least busy ready replica (decoding it again if it was lost)."""
        batch.actor = pool.pick()
        batch.sent_at = time.monotonic()
        if batch.pixels is None:
            batch.pixels = self._decode(batch.uris)
        self._in_flight[batch.actor.predict.remote(batch.pixels)] = batch
        batch.pixels = None  # the call holds it now; a resend decodes again
        pool.sent(batch.actor)

    def _collect(self, pool: PredictorPool, progress: Progress, wait: float = 0.5) -> bool:
        """Wait for some batch to finish, record it, commit shards that are whole; True = stop.

        With ``wait=0`` it only takes what is ready: the manifest loop calls it after every
        shard, so replicas that became ready start work and finished shards are committed
        while a slow manifest (a listing) is still being read, not once it has filled the
        prefetch."""
        import ray

        if self._should_stop():
            for ref in self._in_flight:
                ray.cancel(ref)
            self._in_flight.clear()
            self._decoded.clear()
            return True
        if not progress.processing:
            pool.check_started()
        pool.refresh(timeout=0.0 if self._in_flight else wait)
        self._decode_lost(pool)
        self._dispatch(pool, progress)
        self._report_waiting(pool, progress)
        if progress.processing:
            pool.report_busy(self.job_id, progress.elapsed)
        if not self._in_flight:
            return False  # no replica ready yet: refresh waited for one
        ready, _ = ray.wait(list(self._in_flight), num_returns=1, timeout=wait)
        for ref in ready:
            batch = self._in_flight.pop(ref)
            pool.done(batch.actor)
            try:
                result: PredictedBatch = ray.get(ref)
            except ray.exceptions.RayError as exc:
                self._redo(pool, batch, exc)
                continue
            self._last_batch = time.monotonic()
            self._measure(result, self._last_batch - batch.sent_at)
            batch.work.results[batch.number] = result
            batch.work.waiting -= 1
            self._record(result, progress)
            if batch.work.waiting == 0:
                self._commit(batch.work)
        self._dispatch(pool, progress)
        stall = self.settings.stall_timeout
        if self._in_flight and time.monotonic() - self._last_batch > stall:
            raise InfrastructureError(f"no batch finished for {stall:.0f}s")
        return False

    def _decode_lost(self, pool: PredictorPool) -> None:
        """Once a replaced reservation's successor is placed, decode in it the waiting batches
        whose decode ran in the old one and did not finish on a node still alive (a task bound
        to a removed group may never end; a result on a lost node is gone), and those lost
        meanwhile: their decode overlaps the new replicas' model load."""
        import ray

        if pool.generation == self._generation or pool.replanning:
            return
        self._generation = pool.generation
        kept = pool.surviving([b.pixels for b in self._decoded if b.pixels is not None])
        for batch in self._decoded:
            if batch.pixels is None or batch.pixels not in kept:
                if batch.pixels is not None:
                    with contextlib.suppress(Exception):  # its group is gone: nothing to cancel
                        ray.cancel(batch.pixels)
                    self._redone += 1
                batch.pixels = self._decode(batch.uris)

    def _redo(self, pool: PredictorPool, batch: _Batch, exc: BaseException) -> None:
        """A batch was lost with its replica, node or decode task: decode it again, first in
        line for the next ready replica (the job goes on with the others meanwhile).

        The replica predicts in its own process and turns bad rows into error rows, so a Ray
        error here is the infrastructure's, never the data's: it adds no error row. While the
        reservation is being replaced the batch waits undecoded (``_decode_lost``).
        """
        pool.lost(batch.actor)
        if batch.tries >= BATCH_TRIES:
            raise InfrastructureError(
                f"a batch of shard {batch.work.shard.index} was lost {batch.tries} times: {exc}"
            ) from exc
        self._redone += 1
        batch.tries += 1
        batch.actor = None
        batch.pixels = None if pool.replanning else self._decode(batch.uris)
        self._decoded.appendleft(batch)

    def _report_waiting(self, pool: PredictorPool, progress: Progress) -> None:
        progress.waiting = pool.waiting_reason()
        progress.replanning = pool.replanning
        self._on_progress(progress)

    def _measure(self, batch: PredictedBatch, seconds: float) -> None:
        kinds: dict[str, int] = {}
        for kind, _ in batch.errors.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        metrics.batch_done(self.job_id, self._run_info.model_name, batch.size, kinds, seconds)

    def _record(self, batch: PredictedBatch, progress: Progress) -> None:
        for kind, _ in batch.errors.values():
            self._errors_by_kind[kind] = self._errors_by_kind.get(kind, 0) + 1
        progress.rows_done += batch.size
        progress.rows_this_run += batch.size
        self._model_seconds["champion"] += batch.seconds
        self._model_rows["champion"] += len(batch.positions)
        if batch.challenger is not None:
            self._model_seconds["challenger"] += batch.challenger.seconds
            self._model_rows["challenger"] += len(batch.challenger.positions)
        progress.rows_failed += len(batch.errors)
        self._on_progress(progress)
        self._check_budget(progress)

    def _commit(self, work: _ShardWork) -> None:
        batches = [b for b in work.results if b is not None]
        table = sink.build_table(work.shard, batches, self._run_info)
        sink.write_part(self.spec.output, work.shard.index, table)
        stats = report.count_table(work.shard.index, table, self._began_at)
        report.write_stats(self.spec.output, stats)
        self._stats.append(stats)
        self._open.remove(work)
        self._parts += 1
        if self._first_part_s is None:
            self._first_part_s = round(time.monotonic() - self._began, 3)

    def _plan_incremental(self, source: ModelSource) -> Scored:
        """What earlier nights scored OK with this model version, from the ledger files the
        job's first attempt saw (kept in the output), so a resumed night skips the same rows."""
        assert self._ledger is not None
        plan_uri = storage.join(self.spec.output, INCREMENTAL)
        try:
            files = json.loads(storage.read_bytes(plan_uri))["ledger_files"]
        except NotFoundError:
            files = self._ledger.files()
            record = {"ledger": self._ledger.folder, "ledger_files": files}
            try:
                storage.write_bytes(plan_uri, json.dumps(record, indent=2).encode(),
                                    if_none_match=True)
            except PreconditionFailed:  # another attempt planned first: take its files
                files = json.loads(storage.read_bytes(plan_uri))["ledger_files"]
        return self._ledger.scored(source.name, source.version, files)

    def _new_rows(self, shard: Shard, progress: Progress) -> Shard:
        """The shard less the rows an earlier night scored OK (same content, same model), which
        count as done; the shard itself when the night is not incremental."""
        if self._scored is None:
            return shard
        contents = shard_contents(shard.columns, shard.rows, shard.types)
        seen = self._scored.contains(shard.uris, contents)
        skipped = int(seen.sum())
        if not skipped:
            return shard
        self._skipped += skipped
        progress.rows_done += skipped
        rows = tuple(row for row, old in zip(shard.rows, seen, strict=True) if not old)
        return dataclasses.replace(shard, rows=rows)

    def _check_budget(self, progress: Progress) -> None:
        if self._budget is not None and progress.rows_failed > self._budget:
            raise JobFailed(
                f"{progress.rows_failed} of {progress.rows_total} rows failed, over the error "
                f"budget of {self._budget} (--max-error-rate {self.spec.max_error_rate})"
            )

    def _count_committed(self, committed: dict[int, str], progress: Progress) -> None:
        for shard, uri in committed.items():  # an earlier attempt's parts count in the figures
            stats = report.read_stats(self.spec.output, shard, uri)
            self._stats.append(stats)
            progress.rows_done += stats.rows
            for kind, count in stats.errors.items():
                self._errors_by_kind[kind] = self._errors_by_kind.get(kind, 0) + count
                progress.rows_failed += count

    def _summary(
        self, source: ModelSource, columns: tuple[str, ...], progress: Progress, plan: Plan | None
    ) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "manifest": self.spec.manifest,
            "output": self.spec.output,
            "model": {
                "uri": self.spec.model,
                "name": source.name,
                "version": source.version,
                "saved_model": source.saved_model_uri,
            },
            "columns": list(columns),
            "rows_total": progress.rows_total,
            "rows_ok": progress.rows_done - progress.rows_failed - self._skipped,
            "rows_skipped": self._skipped,
            "incremental": self._incremental_summary(),
            "rows_failed": progress.rows_failed,
            "errors_by_kind": dict(sorted(self._errors_by_kind.items())),
            "rows_this_run": progress.rows_this_run,
            "seconds": round(progress.elapsed, 3),
            "startup_seconds": round(progress.startup_s, 3),
            "first_part_seconds": self._first_part_s,
            "model_busy": _busy_share(self._busy, progress.elapsed),
            "images_per_s": round(progress.images_per_s, 2),
            "parts_written_this_run": self._parts,
            "top_k": self.spec.top_k,
            "outputs": [{"name": name, "column": output_column(name), "size": size}
                        for name, size in self._run_info.outputs.items()],
            "batch_size": self.spec.batch_size,
            "shard_size": self.spec.shard_size,
            "resources": plan.to_dict() if plan else None,
            "batches_redone": self._redone,
            "batches_decoded_before_model": self._prefetched,
            "finished_at": time.time(),
        } | self._challenger_summary(source) | report.figures(self._stats)

    def _challenger_summary(self, source: ModelSource) -> dict[str, Any]:
        """For a job with a challenger: the challenger's model, and each model's speed as the
        rows it scored per second spent inside it (this run's, over all replicas)."""
        if self._challenger is None:
            return {}
        models = {"champion": source, "challenger": self._challenger}
        return {
            "challenger_model": {"uri": self.spec.challenger, "name": self._challenger.name,
                                 "version": self._challenger.version,
                                 "saved_model": self._challenger.saved_model_uri},
            "model_throughput": {
                role: {"name": model.name, "version": model.version,
                       "model_seconds": round(self._model_seconds[role], 3),
                       "images_per_model_second": round(
                           self._model_rows[role] / self._model_seconds[role], 2)
                       if self._model_seconds[role] > 0 else None}
                for role, model in models.items()},
        }

    def _incremental_summary(self) -> dict[str, Any] | None:
        if self._scored is None or self._ledger is None:
            return None
        return {
            "ledger": self._ledger.folder,
            "ledger_files": len(self._scored.files),
            "rows_skipped": self._skipped,
            "why": f"scored without error by the same model version on an earlier night of "
                   f"{self._ledger.spec}, and unchanged since (same ETag, or size and time)",
        }


def run_job(
    job_id: str,
    spec: JobSpec,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    baseline: drift.Baseline | None = None,
    ledger: Ledger | None = None,
    settings: Settings | None = None,
) -> JobResult:
    """Run a whole job on the Ray instance this process is connected to; with a ``baseline``,
    its summary carries its drift against it; with a ``ledger``, only rows it does not hold as
    scored are scored (an incremental night). ``settings``: the process's, read where it
    started; None reads them from the environment now."""
    settings = Settings.from_env() if settings is None else settings
    return JobRunner(job_id, spec, on_progress, should_stop, baseline, ledger,
                     settings=settings).run()


def _prefetch_batches(
    specs: tuple[Any, ...], batch_size: int, floor: int, prefetch_mb: float
) -> int:
    """How many batches may decode ahead while no replica holds the model yet: as many as
    ``prefetch_mb`` of decoded pixels (or of encoded files, ~256 KB a row, for models that
    take them; a challenger's inputs count too), and never fewer than the steady state's
    ``floor``."""
    row = sum(s.height * s.width * 3 if s.kind == "image" and s.height else 256 * 1024
              for s in specs)
    return max(floor, int(prefetch_mb * 1024 * 1024 // (row * batch_size)))


def _resolve(manifest_uri: str, uri: str) -> str:
    """A relative path in the manifest is relative to the manifest's own folder or prefix."""
    uri = uri.strip()
    if not uri or "://" in uri or uri.startswith("/"):
        return uri
    if storage.is_s3(manifest_uri):
        return storage.join(manifest_uri.rsplit("/", 1)[0], uri)
    folder = os.path.dirname(os.path.abspath(storage.local_path(manifest_uri)))
    return os.path.join(folder, uri)


def _busy_share(busy: list[float], seconds: float) -> float | None:
    """The share of the processing time the replicas spent inside the model (1.0: never idle)."""
    if not busy or seconds <= 0:
        return None
    return round(sum(busy) / (len(busy) * seconds), 3)
