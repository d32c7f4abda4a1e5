"""The ``batchinf`` command line: parse, call one library function, show the result.

Exit codes: 0 the job succeeded (or the command did what it says), 1 the job failed or an
error stopped the command, 2 a bad command line, 3 the job was cancelled, 130 interrupted.
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

EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 1, 2, 3

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


def _absolute(uri: str) -> str:
    """Local paths are stored absolute, so a job means the same thing from any folder."""
    import os

    if "://" in uri and not uri.startswith("file://"):
        return uri
    return os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)


@app.command()
def submit(
    manifest: Annotated[str, typer.Argument(help="CSV with a 'uri' column: a path or s3:// URI.")],
    model: Annotated[str, typer.Option(help="Model folder (TF Serving layout or SavedModel).")],
    output: Annotated[str, typer.Option(help="Output folder or s3:// prefix for Parquet parts.")],
    top_k: Annotated[int, typer.Option(help="Predictions kept per image.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 64,
    replicas: Annotated[str, typer.Option(help="Model replicas: N or MIN:MAX.")] = "1",
    gpus_per_replica: Annotated[float, typer.Option(help="GPUs each replica reserves.")] = 0.0,
    cpus_per_replica: Annotated[float, typer.Option(help="CPUs each replica reserves.")] = 1.0,
    model_version: Annotated[int | None, typer.Option(help="Model version [default: highest].")] = None,
    shard_size: Annotated[int, typer.Option(help="Rows per committed Parquet part.")] = 1024,
    max_error_rate: Annotated[
        float, typer.Option(help="Fail the job if more than this fraction of rows fail.")
    ] = 1.0,
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    idempotency_key: Annotated[
        str | None, typer.Option(help="A second submit with this key returns the first job.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Run or follow the job to its end.")] = False,
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a job: classify every image in MANIFEST and write predictions to OUTPUT."""
    from batchinf.job import JobSpec
    from batchinf.store import JobStore

    low, high = parse_replicas(replicas)
    spec = JobSpec(
        manifest=_absolute(manifest),
        model=_absolute(model),
        output=_absolute(output),
        top_k=top_k,
        batch_size=batch_size,
        replicas_min=low,
        replicas_max=high,
        gpus_per_replica=gpus_per_replica,
        cpus_per_replica=cpus_per_replica,
        model_version=model_version,
        max_error_rate=max_error_rate,
        shard_size=shard_size,
        priority=priority,
        idempotency_key=idempotency_key,
    )
    spec.validate()
    job_store = JobStore.from_uri(store)
    job, created = job_store.create(spec)
    if not wait:
        _show({"job_id": job.job_id, "state": job.state.value, "created": created}, as_json,
              f"{job.job_id} {'submitted' if created else 'already submitted'} ({job.state.value})")
        return
    if not as_json:
        typer.echo(f"{job.job_id} {'submitted' if created else 'already submitted'}", err=True)
    _run_here(job_store, job.job_id, as_json)


def _run_here(job_store: Any, job_id: str, as_json: bool) -> None:
    """Embedded default: run the job in this process on a local Ray instance, with progress."""
    from batchinf.pipeline import ensure_ray
    from batchinf.display import ProgressDisplay
    from batchinf.worker import execute

    ensure_ray()
    with ProgressDisplay(job_id, quiet=as_json) as display:
        job = execute(job_store, job_id, f"local-{job_id}", display.update)
    _show_final(job, as_json)


def _show_final(job: Any, as_json: bool) -> None:
    from batchinf.job import JobState

    if as_json:
        typer.echo(json.dumps(job.to_dict(), indent=2))
    else:
        typer.echo(_describe(job))
    if job.state is JobState.CANCELLED:
        raise typer.Exit(EXIT_CANCELLED)
    if job.state is not JobState.SUCCEEDED:
        raise typer.Exit(EXIT_FAILED)


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
    if job.error:
        lines.append(f"  error     {job.error['type']}: {job.error['message']}")
    return "\n".join(lines)


def _show(data: dict, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data) if as_json else text)


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


def main() -> None:
    """Console entry point: one clear line and a non-zero exit for any error we expect."""
    import click

    try:
        code = app(standalone_mode=False)
    except click.exceptions.UsageError as exc:
        typer.echo(f"batchinf: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        typer.echo("batchinf: interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("batchinf: interrupted", err=True)
        sys.exit(130)
    except BatchinfError as exc:
        typer.echo(f"batchinf: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
