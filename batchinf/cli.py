"""The ``batchinf`` command line: parse, call one library function, show the result.

Exit codes: 0 the job succeeded (or the command did what it says), 1 the job failed or an
error stopped the command, 2 a bad command line, 3 the job was cancelled, 4 the job succeeded
but drifted from the previous night past its limit (``drift_alert``), 130 interrupted.
TensorFlow and Ray are imported only by commands that run work, so ``--help``, ``status`` and
an asynchronous ``submit`` stay fast.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from batchinf.errors import BatchinfError, UsageError

app = typer.Typer(
    name="batchinf",
    help="Batch image inference on Ray: submit a manifest, get ranked predictions in Parquet.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_DRIFTED = 1, 2, 3, 4

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="BATCHINF_STORE",
        help="Job store: a folder or s3:// prefix [default: ~/.batchinf].",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        envvar="RAY_ADDRESS",
        help="Ray Jobs API of the cluster, e.g. http://head:8265 [default: a local Ray].",
        show_default=False,
    ),
]
JobArgument = Annotated[str, typer.Argument(help="The job id that submit printed.")]


def parse_replicas(value: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` -> (min, max)."""
    low, _, high = value.partition(":")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError as exc:
        raise UsageError(f"--replicas takes N or MIN:MAX, got {value!r}") from exc
    if not 1 <= lo <= hi:
        raise UsageError(f"--replicas needs 1 <= MIN <= MAX, got {value!r}")
    return lo, hi


def parse_resources(value: str | None) -> dict[str, float]:
    """``KEY=VALUE[,KEY=VALUE]`` -> {key: value} (custom Ray resources per replica)."""
    found: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in (value or "").split(","))):
        key, sep, amount = item.partition("=")
        try:
            found[key.strip()] = float(amount)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise UsageError(f"--replica-resources takes KEY=VALUE[,KEY=VALUE], got {value!r}")
    return found


def _absolute(uri: str) -> str:
    """Local paths are stored absolute, so a job means the same thing from any folder."""
    import os

    if "://" in uri and not uri.startswith("file://"):
        return uri
    return os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)


@app.command()
def submit(
    manifest: Annotated[
        str,
        typer.Argument(help="CSV, .jsonl or .parquet with a 'uri' column (a path or s3:// URI), "
                       "a folder or s3://bucket/prefix/ whose images are listed, or a job spec "
                       "(jobs/*.yaml) whose options apply unless given here."),
    ],
    model: Annotated[str | None, typer.Option(help="Model folder (TF Serving layout or SavedModel).")] = None,
    output: Annotated[str | None, typer.Option(help="Output folder or s3:// prefix for Parquet parts.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Predictions kept per image [default: 5].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per model call [default: 64].")] = None,
    replicas: Annotated[str | None, typer.Option(help="Model replicas: N or MIN:MAX [default: 1].")] = None,
    gpus_per_replica: Annotated[float | None, typer.Option(help="GPUs each replica reserves [default: 0].")] = None,
    cpus_per_replica: Annotated[
        float | None,
        typer.Option(help="Most CPUs each replica reserves [default: what its node has left "
                     "beside decode; 1 for GPU replicas]."),
    ] = None,
    decode_cpus: Annotated[
        float | None,
        typer.Option(help="CPUs kept decoding for the job [default: 0.5, or 4 per GPU].")
    ] = None,
    replica_resources: Annotated[
        str | None,
        typer.Option(help="Custom Ray resources per replica, KEY=VALUE[,KEY=VALUE]: pins "
                     "replicas to the node type that has them."),
    ] = None,
    allowed_buckets: Annotated[
        str | None,
        typer.Option(help="The only buckets the manifest's s3:// rows may name, B1[,B2]; other "
                     "rows get bad_uri [default: any the deployment allows]."),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(help="A listed key (below the prefix) is a row if it matches this glob; "
                     "repeatable [default: image extensions].")
    ] = None,
    model_version: Annotated[int | None, typer.Option(help="Model version [default: highest].")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Rows per committed Parquet part [default: 1024].")] = None,
    max_error_rate: Annotated[
        float | None,
        typer.Option(help="Fail the job if more than this fraction of rows fail [default: 1].")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="Higher runs first [default: 0].")] = None,
    max_drift_psi: Annotated[
        float | None,
        typer.Option(help="Alert (exit 4 with --wait) when the top-1 class or score PSI against "
                     "the spec's previous night is over this [default: the spec's drift.max_psi]."),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="A second submit with this key returns the first job [default for a "
                     "job spec: <name>-<date>]."),
    ] = None,
    incremental: Annotated[
        bool | None,
        typer.Option("--incremental/--all-rows",
                     help="Score only rows that earlier nights of the same spec (or idempotency "
                     "key name) did not score without error by this model version [default: "
                     "the spec's incremental, else all rows]."),
    ] = None,
    date: Annotated[
        str | None,
        typer.Option(help="The date a job spec's {date} stands for, YYYY-MM-DD [default: today]."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Run or follow the job to its end.")] = False,
    store: StoreOption = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a job: classify every image in MANIFEST and write predictions to OUTPUT."""
    from batchinf.job import JobState
    from batchinf.jobstore import JobStore

    given = {
        "model": model, "output": output, "top_k": top_k, "batch_size": batch_size,
        "replicas": replicas, "gpus_per_replica": gpus_per_replica,
        "cpus_per_replica": cpus_per_replica, "decode_cpus": decode_cpus,
        "replica_resources": parse_resources(replica_resources) if replica_resources else None,
        "allowed_buckets": [b.strip() for b in allowed_buckets.split(",") if b.strip()]
        if allowed_buckets is not None else None,
        "model_version": model_version, "shard_size": shard_size,
        "max_error_rate": max_error_rate, "priority": priority,
        "idempotency_key": idempotency_key, "max_drift_psi": max_drift_psi,
        "include": include or None, "incremental": incremental,
    }
    spec = _build_spec(manifest, given, date)
    from batchinf.manifest import check
    from batchinf.model import resolve_model
    from batchinf.signature import inspect

    check(spec.manifest, spec.include)  # a cron typo fails now, in one line, not in a queued job
    inspect(resolve_model(spec.model, spec.model_version))  # and a model it cannot feed
    address = None if address in (None, "", "local") else address
    if address is None:  # runs here, with this machine's files and credentials: check now
        from batchinf import storage

        storage.check_writable(spec.output, "_batchinf-write-check-submit")
    job_store = JobStore.from_uri(store)
    job, created = job_store.create(spec)
    said = "submitted" if created else "already submitted (same idempotency key)"
    head = _local_head(job_store, address, wait)
    dispatched = head is None and _ensure_dispatcher(job_store, address, start=not wait)
    if not wait:
        _show({"job_id": job.job_id, "state": job.state.value, "created": created}, as_json,
              f"{job.job_id} {said} ({job.state.value})")
        return
    if not as_json:
        typer.echo(f"{job.job_id} {said}", err=True)
    if dispatched or not created or job.state is not JobState.QUEUED:
        _follow(job_store, job.job_id, as_json)
    else:
        _run_here(job_store, job.job_id, as_json, head)


def _local_head(job_store: Any, address: str | None, wait: bool) -> Any:
    """With ``--wait`` and no cluster: the running local head of the store's embedded
    dispatcher, which this process joins to run the job itself (no Ray to start, no driver
    to launch, no poll to wait for). None: no such head, or not a ``--wait`` here."""
    if not wait or address is not None:
        return None
    from batchinf.raycluster import running_head

    return running_head(job_store)


def _build_spec(source: str, given: dict[str, Any], date: str | None) -> Any:
    """A JobSpec from a manifest and options, or from a job spec file with options on top."""
    from batchinf import jobfile
    from batchinf.job import JobSpec

    values: dict[str, Any] = {"manifest": source}
    if jobfile.is_spec(source):
        values = jobfile.job_options(jobfile.load(source, jobfile.parse_date(date)))
    elif date is not None:
        raise UsageError("--date applies to a job spec (jobs/*.yaml), not to a manifest")
    values.update({k: v for k, v in given.items() if v is not None})
    for option in ("manifest", "model", "output"):
        if not values.get(option):
            raise UsageError(f"missing --{option}: give it on the command line or in the job spec")
    low, high = parse_replicas(str(values.pop("replicas", 1)))
    if values.get("incremental") and not values.get("name") and values.get("idempotency_key"):
        values["name"] = key_name(str(values["idempotency_key"]))
    for option in ("manifest", "model", "output"):
        values[option] = _absolute(str(values[option]))
    try:
        spec = JobSpec(replicas_min=low, replicas_max=high, **values)
    except TypeError as exc:
        raise UsageError(f"bad job spec value: {exc}") from exc
    spec.validate()
    return spec


def key_name(idempotency_key: str) -> str:
    """The name an idempotency key gives its nights: the key less a trailing ``-YYYY-MM-DD``
    (``nightly-2026-11-21`` -> ``nightly``)."""
    import re

    return re.sub(r"-\d{4}-\d{2}-\d{2}$", "", idempotency_key) or idempotency_key


def _ensure_dispatcher(job_store: Any, address: str | None, *, start: bool) -> bool:
    """True when a dispatcher serves this store (a cluster's, or a local one started here).

    With a cluster address, the cluster's own dispatcher takes the job whenever it runs.
    With none and ``start``, a local dispatcher (with its own local Ray) starts in the
    background and exits after a minute with nothing to do.
    """
    from batchinf.dispatcher import holder_is_gone, nudge

    holder = job_store.lease_holder()
    if address:
        return True
    if holder is not None and not holder_is_gone(holder):
        nudge(holder)  # a dispatcher on this machine takes the job now, not at its next poll
        return True
    if not start:
        return False
    import os
    import subprocess

    log_path = os.path.join(os.path.expanduser("~"), ".batchinf-dispatcher.log")
    with open(log_path, "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "batchinf.cli", "dispatcher", "--store", job_store.root,
             "--idle-exit", "60"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
    return True


def _run_here(job_store: Any, job_id: str, as_json: bool, head: Any = None) -> None:
    """Embedded default: run the job in this process on a local Ray instance, with progress:
    the store's running local ``head`` if there is one, else one started for this run alone
    (without the dashboard, which would end with it).

    An attempt the infrastructure ended is run again here after its back-off, unless a
    dispatcher took the job over meanwhile (then its record is followed).
    """
    import os
    import time

    # Claimed before Ray (and the pipeline's imports, seconds on a busy machine) starts or is
    # joined: a dispatcher's next round would take a job left QUEUED for those seconds, and
    # this process would only follow it.
    run_id = f"local-{job_id}-a{_next(job_store, job_id)}"
    claimed = job_store.claim(job_id, run_id) is not None

    from batchinf.attempt import abandon, run_claimed
    from batchinf.display import ProgressDisplay
    from batchinf.errors import BatchinfError, JobError
    from batchinf.job import JobState
    from batchinf.raycluster import ensure_ray

    while True:
        if not claimed:
            return _follow(job_store, job_id, as_json)
        try:
            if head is not None:
                mode = head.auth_mode()
                if mode and not os.environ.get("RAY_AUTH_MODE"):
                    os.environ["RAY_AUTH_MODE"] = mode  # the head's token auth, as its drivers
                ensure_ray(head.gcs_address)
            else:
                ensure_ray("local", dashboard=False)
        except BatchinfError as exc:
            abandon(job_store, job_id, run_id, exc)
            raise
        with ProgressDisplay(job_id, quiet=as_json) as display:
            try:
                job = run_claimed(job_store, job_id, run_id, display.update)
            except JobError:  # taken over meanwhile
                return _follow(job_store, job_id, as_json)
        if job.state is not JobState.QUEUED:
            return _show_final(job, as_json)
        if not as_json:
            typer.echo(f"{job_id}: attempt {job.attempt} ended ({job.attempts[-1]['reason']}); "
                       f"retrying in {max(0, (job.retry_at or 0) - time.time()):.0f} s", err=True)
        time.sleep(max(0.0, (job.retry_at or 0) - time.time()))
        run_id = f"local-{job_id}-a{_next(job_store, job_id)}"
        claimed = job_store.claim(job_id, run_id) is not None


def _next(job_store: Any, job_id: str) -> int:
    return int(job_store.get(job_id).attempt) + 1


def _show_final(job: Any, as_json: bool, *, drift_exit: bool = True) -> None:
    """Show how the job ended and exit with the code that says so (``drift_exit=False``: a
    drift alert still exits 0, as a Ray job's entrypoint must for a job that succeeded)."""
    from batchinf.job import JobState

    if as_json:
        typer.echo(json.dumps(job.to_dict(), indent=2))
    else:
        typer.echo(_describe(job))
    if job.state is not JobState.SUCCEEDED:  # one line for cron's mail and for alerting
        error = f": {job.error['type']}: {job.error['message']}" if job.error else ""
        typer.echo(f"batchinf: job {job.job_id} {job.state.value}{error}", err=True)
    if job.state is JobState.CANCELLED:
        raise typer.Exit(EXIT_CANCELLED)
    if job.state is not JobState.SUCCEEDED:
        raise typer.Exit(EXIT_FAILED)
    if job.drift_alert:
        from batchinf.drift import describe_alert

        typer.echo(f"batchinf: job {job.job_id} drifted: {describe_alert(job.drift_alert)}", err=True)
        if drift_exit:
            raise typer.Exit(EXIT_DRIFTED)


def _describe(job: Any) -> str:
    lines = [f"{job.job_id}: {job.state.value}"]
    if job.summary:
        s = job.summary
        kinds = ", ".join(f"{k} {v}" for k, v in s["errors_by_kind"].items()) or "none"
        lines += [
            f"  rows      {s['rows_total']} ({s['rows_ok']} ok, {s['rows_failed']} failed: {kinds})",
            f"  speed     {s['images_per_s']} images/s over {s['seconds']} s",
            f"  output    {s['output']}",
        ]
    if job.drift_alert:
        from batchinf.drift import describe_alert

        lines.append(f"  drift     {describe_alert(job.drift_alert)}")
    if job.error:
        lines.append(f"  error     {job.error['type']}: {job.error['message']}")
    return "\n".join(lines)


def _show(data: dict, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data) if as_json else text)


def _follow(job_store: Any, job_id: str, as_json: bool) -> None:
    """Follow a job that runs elsewhere, from its record, until it ends."""
    import time

    from batchinf.display import ProgressDisplay, Snapshot

    with ProgressDisplay(job_id, quiet=as_json) as display:
        while True:
            job = job_store.get(job_id)
            display.update(Snapshot(job.rows_total, job.rows_done, job.rows_failed,
                                    job.images_per_s or 0.0, waiting=_waiting_line(job)))
            if job.state.terminal:
                break
            time.sleep(1.0)
    _show_final(job, as_json)


def _waiting_line(job: Any) -> str | None:
    """What a job waits for, as a person would want it said (None when it is moving)."""
    import time

    if job.state.value == "QUEUED":
        wait_s = (job.retry_at or 0) - time.time()
        if job.launch_error:
            when = f"retry in {wait_s:.0f} s" if wait_s > 0 else "retrying now"
            return f"launch refused by the cluster: {job.launch_error}; {when}"
        if wait_s > 0:
            return f"queued: attempt {job.attempt + 1} starts in {wait_s:.0f} s"
        return "queued: waiting for a dispatcher and a free slot"
    return job.waiting


@app.command()
def status(job_id: JobArgument, store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Show a job's state, rows done / failed / total, speed, ETA and output."""
    from batchinf.jobstore import JobStore

    job = JobStore.from_uri(store).get(job_id)
    if as_json:
        typer.echo(json.dumps(job.to_dict(), indent=2))
        return
    total = job.rows_total if job.rows_total is not None else "?"
    rate = job.images_per_s or 0.0
    eta = ""
    if job.state.value == "RUNNING" and rate > 0 and job.rows_total:
        eta = f", ETA {int((job.rows_total - job.rows_done) / rate)} s"
    lines = [
        f"{job.job_id}: {job.state.value} (attempt {job.attempt}, priority {job.spec.priority})",
        f"  rows      {job.rows_done}/{total} done, {job.rows_failed} failed",
        f"  speed     {rate:.1f} images/s{eta}",
        f"  output    {job.spec.output}",
    ]
    if job.ray_job_id:
        lines.append(f"  ray job   {job.ray_job_id}")
    waiting = _waiting_line(job)
    if waiting and not job.state.terminal:
        lines.append(f"  waiting   {waiting}")
    if job.attempts_dropped:
        lines.append(f"  attempts  {job.attempts_dropped} earlier ones not kept")
    for past in job.attempts:
        lines.append(f"  attempt {past['attempt']} {past['outcome']}: {past.get('reason') or 'ok'}")
    if job.cancel_requested and not job.state.terminal:
        lines.append("  cancel    requested")
    if job.drift_alert:
        from batchinf.drift import describe_alert

        lines.append(f"  drift     {describe_alert(job.drift_alert)}")
    if job.error:
        lines.append(f"  error     {job.error['type']}: {job.error['message']}")
    typer.echo("\n".join(lines))


@app.command("list")
def list_jobs(
    state: Annotated[
        list[str] | None, typer.Option(help="Only jobs in this state (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Jobs on one page.")] = 50,
    before: Annotated[
        str | None, typer.Option(help="Page on from this job id (the one a page ends with).")
    ] = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first, a page at a time (--before JOB for the next page)."""
    from batchinf.job import JobState
    from batchinf.jobstore import JobStore

    try:
        states = {JobState(s.upper()) for s in state} if state else None
    except ValueError as exc:
        raise UsageError(f"--state takes one of {', '.join(s.value for s in JobState)}") from exc
    jobs, more = JobStore.from_uri(store).page(states, limit=limit, before=before)
    if as_json:
        typer.echo(json.dumps([j.to_dict() for j in jobs], indent=2))
    else:
        typer.echo(f"{'JOB':<28}{'STATE':<11}{'PRIO':>5}{'ROWS':>16}  OUTPUT")
        for j in jobs:
            rows = f"{j.rows_done}/{j.rows_total if j.rows_total is not None else '?'}"
            typer.echo(f"{j.job_id:<28}{j.state.value:<11}{j.spec.priority:>5}{rows:>16}  {j.spec.output}")
    if more:
        typer.echo(f"more: batchinf list --before {more}", err=True)


@app.command()
def prune(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age of finished jobs to remove: 30d, 12h, 90m.")
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove the records of finished jobs older than an age; outputs are never touched."""
    from batchinf.jobstore import JobStore

    seconds = parse_age(older_than)
    gone = JobStore.from_uri(store).prune(seconds, dry_run=dry_run)
    ids = [j.job_id for j in gone]
    verb = "would remove" if dry_run else "removed"
    _show({"removed": ids, "dry_run": dry_run}, as_json,
          f"{verb} {len(ids)} finished job record(s) older than {older_than}")


def parse_age(value: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` -> seconds."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    number, unit = value[:-1], value[-1:].lower()
    try:
        seconds = float(number) * units[unit]
    except (KeyError, ValueError) as exc:
        raise UsageError(f"--older-than takes an age such as 30d, 12h or 90m, got {value!r}") from exc
    if seconds < 0:
        raise UsageError(f"--older-than cannot be negative, got {value!r}")
    return seconds


@app.command()
def latest(
    name: Annotated[str, typer.Argument(help="The job spec's name (or idempotency key less its date).")],
    output: Annotated[
        str | None, typer.Option(help="Write every URI's newest row here as Parquet.")
    ] = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """The newest prediction of every URI across all nights of a spec, from its ledger."""
    import io

    import pyarrow.parquet as pq

    from batchinf import storage
    from batchinf.jobstore import JobStore
    from batchinf.ledger import Ledger

    table = Ledger(JobStore.from_uri(store).root, name).latest()
    if output:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(_absolute(output), buffer.getvalue())
    if as_json:
        rows = table.drop_columns(["scored_at"]).to_pylist() if not output else []
        typer.echo(json.dumps({"uris": table.num_rows, "output": output, "rows": rows}))
        return
    typer.echo(f"{table.num_rows} URIs scored by nights of {name}"
               + (f"; newest row of each written to {output}" if output else ""))
    for row in table.slice(0, 0 if output else 20).to_pylist():
        typer.echo(f"  {row['uri']}  {row['top1_label']}  {row['top1_score']}  {row['job_id']}")


@app.command()
def wait(job_id: JobArgument, store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Follow a job until it ends; the exit code says how (0 ok, 1 failed, 3 cancelled,
    4 succeeded but drifted past its limit)."""
    from batchinf.jobstore import JobStore

    _follow(JobStore.from_uri(store), job_id, as_json)


@app.command()
def report(
    job_id: JobArgument,
    against: Annotated[
        str | None,
        typer.Option(help="Compare with this job [default: the job's own baseline, the previous "
                     "night of its spec].", show_default=False),
    ] = None,
    html: Annotated[
        str | None,
        typer.Option(help="Write the page here [default: _report.html in the job's output].",
                     show_default=False),
    ] = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a job's figures (classes, scores, errors, speed, drift) and write its report page."""
    from batchinf.jobstore import JobStore
    from batchinf.report import describe
    from batchinf.reportpage import job_report

    summary, page = job_report(JobStore.from_uri(store), job_id, against, html)
    if as_json:
        typer.echo(json.dumps(summary | {"report": page}, indent=2))
        return
    typer.echo(describe(summary))
    drift = summary.get("drift")
    if drift:
        moved = ", ".join(f"{m['label']} {m['change']:+.1%}" for m in drift["classes_moved"])
        typer.echo(f"  drift against {drift['against']}: class PSI {drift['top1_class_psi']:.4f}, "
                   f"score PSI {drift['top1_score_psi']:.4f}, error rate "
                   f"{drift['error_rate_change']:+.2%}, moved most: {moved or 'none'}")
    typer.echo(f"  report    {page}")


@app.command()
def cancel(
    job_id: JobArgument,
    store: StoreOption = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once requested.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Cancel a job: a queued one at once, a running one within seconds (no _SUCCESS)."""
    import time

    from batchinf.jobstore import JobStore

    job_store = JobStore.from_uri(store)
    job = job_store.request_cancel(job_id)
    deadline = time.monotonic() + 120
    while not no_wait and not job.state.terminal and time.monotonic() < deadline:
        time.sleep(0.5)
        job = job_store.get(job_id)
    _show({"job_id": job_id, "state": job.state.value, "cancel_requested": job.cancel_requested},
          as_json, f"{job_id}: {job.state.value}"
          + (" (cancel requested)" if not job.state.terminal else ""))


@app.command()
def resume(
    job_id: JobArgument,
    wait: Annotated[bool, typer.Option("--wait", help="Run or follow it to its end.")] = False,
    store: StoreOption = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Queue a failed, cancelled or orphaned job again; it redoes only uncommitted shards."""
    from batchinf.attempt import runner_is_gone
    from batchinf.job import Job, JobState, transition
    from batchinf.jobstore import JobStore

    job_store = JobStore.from_uri(store)

    def requeue(job: Job) -> Job:
        if job.state in (JobState.FAILED, JobState.CANCELLED):
            return transition(job, JobState.QUEUED)
        if job.state is JobState.RUNNING and runner_is_gone(job):
            return transition(job, JobState.QUEUED)
        if job.state is JobState.QUEUED:
            return job
        raise UsageError(f"job {job_id} is {job.state.value}; only FAILED, CANCELLED or "
                         "orphaned RUNNING jobs can be resumed")

    job = job_store.update(job_id, requeue)
    address = None if address in (None, "", "local") else address
    head = _local_head(job_store, address, wait)
    dispatched = head is None and _ensure_dispatcher(job_store, address, start=not wait)
    if not wait:
        _show({"job_id": job_id, "state": job.state.value}, as_json, f"{job_id}: {job.state.value}")
        return
    if dispatched:
        _follow(job_store, job_id, as_json)
    else:
        _run_here(job_store, job_id, as_json, head)


@app.command()
def logs(job_id: JobArgument, store: StoreOption = None, address: AddressOption = None) -> None:
    """Print the logs of the job's current (or last) Ray job."""
    from batchinf.jobstore import JobStore
    from batchinf.raycluster import jobs_client

    job = JobStore.from_uri(store).get(job_id)
    target = address or job.ray_address
    if not job.ray_job_id or job.ray_job_id.startswith("local-") or not target:
        raise UsageError(f"job {job_id} ran in-process (submit --wait): its log went to that terminal")
    typer.echo(jobs_client(target).get_job_logs(job.ray_job_id), nl=False)


@app.command()
def dispatcher(
    address: AddressOption = None,
    store: StoreOption = None,
    max_running: Annotated[int, typer.Option(help="Jobs running at once.")] = 2,
    poll: Annotated[float, typer.Option(help="Seconds between rounds.")] = 2.0,
    idle_exit: Annotated[
        float | None, typer.Option(help="Exit after this many idle seconds [default: never].")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve queue depth (batchinf_jobs) for Prometheus on 127.0.0.1:PORT."),
    ] = None,
) -> None:
    """Run the dispatcher: launch queued jobs as Ray jobs, requeue orphans (runs on the head)."""
    import logging

    from batchinf.dispatcher import Dispatcher
    from batchinf.jobstore import JobStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if max_running < 1:
        raise UsageError("--max-running must be at least 1")
    job_store = JobStore.from_uri(store)
    Dispatcher(job_store, address or None, max_running=max_running,
               metrics_port=metrics_port).serve(poll, idle_exit)


@app.command("serve")
def serve_command(
    model: Annotated[str, typer.Option(help="Model folder or s3:// prefix (TF Serving layout or "
                                       "SavedModel), as batch jobs take it.")],
    model_version: Annotated[list[int] | None, typer.Option(
        help="Model version; repeat to serve several [default: highest].")] = None,
    all_versions: Annotated[bool, typer.Option(help="Serve every version of the model.")] = False,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs "
                                      "BATCHINF_SERVE_TOKEN.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    replicas: Annotated[str, typer.Option(help="Model replicas: N, or MIN:MAX to autoscale.")] = "1",
    gpus_per_replica: Annotated[float, typer.Option(help="GPUs each replica reserves.")] = 0.0,
    cpus_per_replica: Annotated[
        float | None,
        typer.Option(help="CPUs each replica reserves; TensorFlow gets as many threads "
                     "[default: 1 CPU, threads for every core].", show_default=False),
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most requests in one model call.")] = 16,
    batch_wait_ms: Annotated[
        float, typer.Option(help="How long a model call waits for more requests to join it.")
    ] = 5.0,
    top_k: Annotated[int, typer.Option(help="Classes returned unless a request asks for top_k.")] = 5,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join as a driver: auto or HEAD:6379 on a cluster node, "
                     "ray://HEAD:10001 elsewhere [default: a local Ray].", show_default=False),
    ] = None,
) -> None:
    """Serve the model over HTTP until SIGINT or SIGTERM: POST an image, get ranked classes."""
    from batchinf.online.launch import ServeOptions, serve, take_token

    low, high = parse_replicas(replicas)
    options = ServeOptions(
        model=_absolute(model), model_versions=tuple(model_version or ()),
        all_versions=all_versions, host=host, port=port,
        replicas_min=low, replicas_max=high, gpus_per_replica=gpus_per_replica,
        cpus_per_replica=cpus_per_replica, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, top_k=top_k,
        address=None if address in (None, "", "local") else address,
    )
    options.validate()
    token = take_token(host)
    serve(options, token, lambda line: typer.echo(f"batchinf serve: {line}", err=True))


@app.command(hidden=True)
def run(
    job_id: JobArgument,
    run_id: Annotated[str, typer.Option(help="The attempt's Ray submission id.")],
    store: StoreOption = None,
) -> None:
    """Entrypoint of a job's Ray job: run a claimed job here (the dispatcher calls this)."""
    from batchinf.attempt import run_claimed
    from batchinf.display import ProgressDisplay
    from batchinf.jobstore import JobStore
    from batchinf.raycluster import ensure_ray

    ensure_ray()
    job_store = JobStore.from_uri(store)
    with ProgressDisplay(job_id) as display:
        job = run_claimed(job_store, job_id, run_id, display.update)
    _show_final(job, False, drift_exit=False)


@app.command()
def demo(
    folder: Annotated[str, typer.Option(help="Where the demo writes its model, images and output.")]
    = "batchinf-demo",
    as_json: JsonOption = False,
) -> None:
    """Train a digits classifier, export it, and run a whole batch job on its held-out images."""
    from batchinf.demo import run_demo

    report = run_demo(folder, quiet=as_json)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    if report["state"] != "SUCCEEDED":
        raise typer.Exit(EXIT_FAILED)


def _click_errors() -> tuple[type[Exception], type[BaseException]]:
    """Typer 0.29 vendors click; older ones use the click package. Both raise these two."""
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - depends on the installed typer
        from click.exceptions import ClickException
    return ClickException, typer.Abort


def main() -> None:
    """Console entry point: one clear line and a non-zero exit for any error we expect."""
    click_error, abort = _click_errors()
    try:
        code = app(standalone_mode=False)
    except click_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and getattr(exc, "ctx", None) is not None:
            typer.echo(exc.ctx.get_help(), err=True)  # type: ignore[attr-defined]
            sys.exit(EXIT_USAGE)
        message = exc.format_message().replace("\n", " ")  # type: ignore[attr-defined]
        typer.echo(f"batchinf: {message}", err=True)
        sys.exit(EXIT_USAGE)
    except (abort, KeyboardInterrupt):
        typer.echo("batchinf: interrupted", err=True)
        sys.exit(130)
    except BatchinfError as exc:
        typer.echo(f"batchinf: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
