"""The ``batchinf`` command line: parse, call one library function, show the result.

Exit codes: 0 the job succeeded (or the command did what it says), 1 the job failed or an
error stopped the command, 2 a bad command line, 3 the job was cancelled, 4 the job succeeded
but drifted from the previous night past its limit (``drift_alert``), 130 interrupted.
TensorFlow and Ray are imported only by commands that run work, so ``--help``, ``status`` and
an asynchronous ``submit`` stay fast.
"""

from __future__ import annotations

import functools
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
    top_k: Annotated[
        int | None,
        typer.Option(help="Predictions kept per image; 0 for none (with --outputs) [default: 5]."),
    ] = None,
    outputs: Annotated[
        str | None,
        typer.Option(help="Outputs of the serving signature to write as columns output_<name>, "
                     "NAME[,NAME]: float [N, D] tensors such as an embedding [default: none]."),
    ] = None,
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
    memory_per_replica: Annotated[
        str | None,
        typer.Option(help="Memory each replica reserves on its node, e.g. 3GiB [default: "
                     "estimated from its models' files, input size and the batch size]."),
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
    challenger: Annotated[
        str | None,
        typer.Option(help="A second model run on the same decoded images; its top-k goes into "
                     "challenger_* columns and the report compares the two [default: none]."),
    ] = None,
    challenger_version: Annotated[
        int | None, typer.Option(help="The challenger's version [default: highest].")] = None,
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

    given = {
        "model": model, "output": output, "top_k": top_k, "outputs": outputs,
        "batch_size": batch_size,
        "replicas": replicas, "gpus_per_replica": gpus_per_replica,
        "cpus_per_replica": cpus_per_replica, "decode_cpus": decode_cpus,
        "memory_per_replica": memory_per_replica,
        "replica_resources": parse_resources(replica_resources) if replica_resources else None,
        "allowed_buckets": [b.strip() for b in allowed_buckets.split(",") if b.strip()]
        if allowed_buckets is not None else None,
        "model_version": model_version, "shard_size": shard_size,
        "challenger": challenger, "challenger_version": challenger_version,
        "max_error_rate": max_error_rate, "priority": priority,
        "idempotency_key": idempotency_key, "max_drift_psi": max_drift_psi,
        "include": include or None, "incremental": incremental,
    }
    client = _client(store, address)
    submitted = client.enqueue(client.build_spec(manifest, date=date, **given), wait=wait)
    job = submitted.job
    said = "submitted" if submitted.created else "already submitted (same idempotency key)"
    if not wait:
        _show({"job_id": job.job_id, "state": job.state.value, "created": submitted.created},
              as_json, f"{job.job_id} {said} ({job.state.value})")
        return
    if not as_json:
        typer.echo(f"{job.job_id} {said}", err=True)
    with _Display(job.job_id, quiet=as_json) as display:
        job = client.finish(submitted, display.update, display.retrying)
    _show_final(job, as_json)


class _Display:
    """A job's progress on stderr while this command runs or follows it: a bar (or, off a
    terminal, log lines) per attempt; an attempt that will be retried ends its bar and says
    why, and the next attempt draws its own."""

    def __init__(self, job_id: str, *, quiet: bool) -> None:
        self.job_id, self.quiet = job_id, quiet
        self._current: Any = None

    def __enter__(self) -> _Display:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, progress: Any) -> None:
        if self._current is None:
            from batchinf.display import ProgressDisplay

            self._current = ProgressDisplay(self.job_id, quiet=self.quiet,
                                            settings=_settings()).__enter__()
        self._current.update(progress)

    def retrying(self, job: Any) -> None:
        import time

        self.close()
        if not self.quiet:
            typer.echo(f"{job.job_id}: attempt {job.attempt} ended ({job.attempts[-1]['reason']}); "
                       f"retrying in {max(0, (job.retry_at or 0) - time.time()):.0f} s", err=True)

    def close(self) -> None:
        if self._current is not None:
            self._current.__exit__(None, None, None)
            self._current = None


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


@app.command()
def status(job_id: JobArgument, store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Show a job's state, rows done / failed / total, speed, ETA and output."""
    from batchinf.client import waiting_line

    job = _client(store).status(job_id)
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
    waiting = waiting_line(job)
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

    try:
        states = {JobState(s.upper()) for s in state} if state else None
    except ValueError as exc:
        raise UsageError(f"--state takes one of {', '.join(s.value for s in JobState)}") from exc
    jobs, more = _client(store).jobs(states, limit=limit, before=before)
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

    seconds = parse_age(older_than)
    gone = _store(store).prune(seconds, dry_run=dry_run)
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
    from batchinf.client import absolute_uri

    table = _client(store).latest(name)
    if output:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(absolute_uri(output), buffer.getvalue())
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

    client = _client(store)
    with _Display(job_id, quiet=as_json) as display:
        job = client.wait(job_id, display.update)
    _show_final(job, as_json)


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
    from batchinf.report import describe
    from batchinf.reportpage import job_report

    summary, page = job_report(_store(store), job_id, against, html)
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

    job = _client(store).cancel(job_id, wait=not no_wait)
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

    client = _client(store, address)
    if not wait:
        job = client.resume(job_id)
        _show({"job_id": job_id, "state": job.state.value}, as_json, f"{job_id}: {job.state.value}")
        return
    with _Display(job_id, quiet=as_json) as display:
        job = client.resume(job_id, wait=True, on_progress=display.update,
                            on_retry=display.retrying)
    _show_final(job, as_json)


@app.command()
def logs(job_id: JobArgument, store: StoreOption = None, address: AddressOption = None) -> None:
    """Print the logs of the job's current (or last) Ray job."""

    typer.echo(_client(store, address).logs(job_id), nl=False)


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

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if max_running < 1:
        raise UsageError("--max-running must be at least 1")
    job_store = _store(store)
    Dispatcher(job_store, address or None, max_running=max_running,
               metrics_port=metrics_port, settings=_settings()).serve(poll, idle_exit)


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
    from batchinf.client import absolute_uri, parse_replicas
    from batchinf.online.launch import ServeOptions, serve, take_token

    low, high = parse_replicas(replicas)
    options = ServeOptions(
        model=absolute_uri(model), model_versions=tuple(model_version or ()),
        all_versions=all_versions, host=host, port=port,
        replicas_min=low, replicas_max=high, gpus_per_replica=gpus_per_replica,
        cpus_per_replica=cpus_per_replica, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, top_k=top_k,
        address=None if address in (None, "", "local") else address,
    )
    options.validate()
    token = take_token(host, _settings())
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
    from batchinf.raycluster import ensure_ray

    settings = _settings()
    ensure_ray()
    job_store = _store(store)
    with ProgressDisplay(job_id, settings=settings) as display:
        job = run_claimed(job_store, job_id, run_id, display.update, settings)
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


@functools.cache
def _settings() -> Any:
    """This command's settings, read from the environment once; S3 access is set up with them."""
    from batchinf import storage
    from batchinf.settings import SettingError, Settings

    try:
        settings = Settings.from_env()
    except SettingError as exc:
        raise UsageError(str(exc)) from None
    storage.configure(settings)
    return settings


def _store(store: str | None) -> Any:
    """The job store the command names, else the settings' one (read with the settings)."""
    from batchinf.jobstore import JobStore

    return JobStore.from_uri(store or _settings().store_uri)


def _client(store: str | None, address: str | None = None) -> Any:
    from batchinf.client import Client

    return Client(store, address, settings=_settings())


def _click_errors() -> tuple[type[Exception], type[BaseException]]:
    """Typer 0.29 vendors click; older ones use the click package. Both raise these two."""
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - depends on the installed typer
        from click.exceptions import ClickException  # type: ignore[assignment]
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
