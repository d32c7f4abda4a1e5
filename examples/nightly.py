"""A nightly batch job from cron or Airflow, through the library client instead of the CLI.

It submits a job spec (or a manifest with options) for a date, runs or follows the job to its
end, prints one line about it, and fails (non-zero exit, or an exception in Airflow) when the
job did not succeed or drifted from the previous night past the spec's limit.

From cron (``--address`` or RAY_ADDRESS: the job runs on that cluster; else on this machine)::

    0 2 * * *  /opt/batchinf/.venv/bin/python examples/nightly.py jobs/nightly.yaml >> nightly.log 2>&1

From Airflow, as the body of a task (a raised ``NightFailed`` fails the task and its retries
resubmit the same night: the spec's idempotency key returns the same job)::

    @task
    def score_photos(ds: str) -> str:
        job = run_night("jobs/nightly.yaml", date=ds, address="http://ray-head:8265")
        return job.spec.output
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from batchinf.client import Client
from batchinf.errors import BatchinfError
from batchinf.job import Job, JobState

EXIT_FAILED, EXIT_CANCELLED, EXIT_DRIFTED = 1, 3, 4  # the codes `batchinf submit --wait` uses


class NightFailed(Exception):
    """The night's job did not succeed, or drifted past its limit; ``exit_code`` says which."""

    def __init__(self, job: Job, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.job, self.exit_code = job, exit_code


def run_night(source: str, *, date: str | None = None, store: str | None = None,
              address: str | None = None, **options: Any) -> Job:
    """Submit ``source`` for ``date`` and wait for its end; the final record, or NightFailed."""
    job = Client(store=store, address=address).submit(source, date=date, wait=True, **options)
    if job.state is not JobState.SUCCEEDED:
        error = f": {job.error['type']}: {job.error['message']}" if job.error else ""
        code = EXIT_CANCELLED if job.state is JobState.CANCELLED else EXIT_FAILED
        raise NightFailed(job, f"job {job.job_id} {job.state.value}{error}", code)
    if job.drift_alert:
        raise NightFailed(job, f"job {job.job_id} drifted: {job.drift_alert}", EXIT_DRIFTED)
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a job spec (jobs/*.yaml) or a manifest")
    parser.add_argument("--date", help="the night, YYYY-MM-DD [default: today]")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray Jobs API of the cluster [default: RAY_ADDRESS, else this machine]")
    args = parser.parse_args(argv)
    try:
        job = run_night(args.source, date=args.date, address=args.address)
    except NightFailed as exc:
        print(f"nightly: {exc}", file=sys.stderr)
        return exc.exit_code
    except BatchinfError as exc:  # refused before any work: a bad spec, model or output
        print(f"nightly: {exc}", file=sys.stderr)
        return exc.exit_code
    summary = job.summary or {}
    print(f"{job.job_id}: {summary.get('rows_ok')} rows scored, {summary.get('rows_failed')} "
          f"failed, in {summary.get('seconds')} s; output {job.spec.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
