"""The job store on both kinds of root: a local folder and an S3 prefix on moto's server."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from batchinf import storage
from batchinf.errors import IllegalTransition, JobNotFound, OutputTaken
from batchinf.job import Job, JobSpec, JobState, transition
from batchinf.jobstore import JobStore, default_store_uri

T = TypeVar("T")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> JobStore:
    if request.param == "local":
        return JobStore.from_uri(str(tmp_path / "store"))
    return JobStore.from_uri(f"s3://{request.getfixturevalue('bucket')}/batchinf")


def spec(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {"manifest": "s3://in/manifest.csv", "model": "/models/mnv2",
                              "output": "/out", **overrides}
    return JobSpec(**fields)


def race(n: int, fn: Callable[[int], T]) -> list[T]:
    """Run ``fn(0..n-1)`` on n threads released together; their results in order."""
    start, results = threading.Barrier(n), dict[int, T]()

    def run(i: int) -> None:
        start.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(n)]


def test_create_then_get_returns_the_same_queued_job(store: JobStore) -> None:
    job, created = store.create(spec(top_k=3))
    assert created and job.state is JobState.QUEUED
    assert store.get(job.job_id) == job


def test_get_of_an_unknown_or_malformed_id_raises_job_not_found(store: JobStore) -> None:
    for job_id in ["bi-20260101-000000-abcdef", "../../etc/passwd", ""]:
        with pytest.raises(JobNotFound):
            store.get(job_id)


def test_list_is_oldest_first_and_filters_by_state(store: JobStore) -> None:
    ids = [store.create(spec(output=f"/out{t}"), now=t)[0].job_id for t in (30.0, 10.0, 20.0)]
    store.request_cancel(ids[2])
    assert [j.job_id for j in store.list()] == [ids[1], ids[2], ids[0]]
    assert [j.job_id for j in store.list({JobState.QUEUED})] == [ids[1], ids[0]]
    assert [j.job_id for j in store.list({"CANCELLED"})] == [ids[2]]


def test_an_output_taken_by_a_queued_job_is_refused_until_that_job_ends(store: JobStore) -> None:
    first, _ = store.create(spec())
    with pytest.raises(OutputTaken, match=f"taken by job {first.job_id} .QUEUED."):
        store.create(spec(output="/out/"))
    store.request_cancel(first.job_id)
    assert store.create(spec())[1] is True


def test_idempotency_key_returns_the_first_job(store: JobStore) -> None:
    first, created = store.create(spec(idempotency_key="nightly-2026-11-21"))
    again, created_again = store.create(spec(idempotency_key="nightly-2026-11-21", top_k=9))
    assert (created, created_again) == (True, False)
    assert again == first and len(store.list()) == 1


def test_racing_submits_with_one_key_make_one_job(store: JobStore) -> None:
    results = race(8, lambda i: store.create(spec(idempotency_key="cron", priority=i)))
    assert len({job.job_id for job, _ in results}) == 1
    assert [created for _, created in results].count(True) == 1
    assert len(store.list()) == 1


def test_submit_completes_a_key_whose_first_submitter_died(store: JobStore) -> None:
    orphan = Job.new(spec(idempotency_key="k"))
    store._claim_key("k", orphan)  # the key was written, then the submitter died
    job, created = store.create(spec(idempotency_key="k"))
    assert (job, created) == (orphan, False) and store.get(orphan.job_id) == orphan


def test_exactly_one_of_eight_racing_claims_wins(store: JobStore) -> None:
    job, _ = store.create(spec())
    claims = race(8, lambda i: store.claim(job.job_id, f"raysubmit_{i}"))
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1
    final = store.get(job.job_id)
    assert (final.state, final.attempt, final.ray_job_id) == (
        JobState.RUNNING, 1, winners[0].ray_job_id,
    )  # fmt: skip


def test_cancel_racing_claims_leaves_a_consistent_state(store: JobStore) -> None:
    job, _ = store.create(spec())

    def cancel_or_claim(i: int) -> Job | None:
        if i % 2:
            store.request_cancel(job.job_id)
            return None
        return store.claim(job.job_id, f"raysubmit_{i}")

    claimed = [c for c in race(8, cancel_or_claim) if c is not None]
    final = store.get(job.job_id)
    assert final.cancel_requested
    if claimed:  # a claim came first: the runner is told to stop
        assert (len(claimed), final.state, final.attempt) == (1, JobState.RUNNING, 1)
    else:  # a cancel came first: nobody ever ran it
        assert (final.state, final.attempt, final.started_at) == (JobState.CANCELLED, 0, None)


def test_claim_of_a_requeued_job_with_a_pending_cancel_cancels_it(store: JobStore) -> None:
    job, _ = store.create(spec())
    store.claim(job.job_id, "raysubmit_a")
    store.request_cancel(job.job_id)
    store.update(job.job_id, lambda j: transition(j, JobState.QUEUED))  # its Ray job vanished
    assert store.claim(job.job_id, "raysubmit_b") is None
    assert store.get(job.job_id).state is JobState.CANCELLED


def test_update_reapplies_a_change_when_the_record_moved_under_it(store: JobStore) -> None:
    job, _ = store.create(spec())
    store.claim(job.job_id, "raysubmit_a")
    calls: list[int] = []

    def change(j: Job) -> Job:
        calls.append(j.rows_done)
        if len(calls) == 1:  # another writer gets in between our read and our write
            store.record_progress(job.job_id, rows_done=10, rows_failed=1, rows_total=100)
        return dataclasses.replace(j, summary={"note": "mine"})

    final = store.update(job.job_id, change)
    assert calls == [0, 10]
    assert (final.rows_done, final.rows_failed, final.summary) == (10, 1, {"note": "mine"})
    assert store.get(job.job_id) == final


def test_update_refuses_a_state_change_that_skipped_the_door(store: JobStore) -> None:
    job, _ = store.create(spec())
    with pytest.raises(IllegalTransition):
        store.update(job.job_id, lambda j: dataclasses.replace(j, state=JobState.SUCCEEDED))
    assert store.get(job.job_id).state is JobState.QUEUED


def test_cancel_of_a_running_job_only_asks_its_runner(store: JobStore) -> None:
    job, _ = store.create(spec())
    store.claim(job.job_id, "raysubmit_a")
    cancelled = store.request_cancel(job.job_id)
    assert (cancelled.state, cancelled.cancel_requested) == (JobState.RUNNING, True)


def test_progress_from_a_stale_attempt_is_ignored(store: JobStore) -> None:
    job, _ = store.create(spec())
    store.claim(job.job_id, "raysubmit_new")
    store.record_progress(job.job_id, 5, 0, 50, ray_job_id="raysubmit_new")
    stale = store.record_progress(job.job_id, 99, 9, 50, ray_job_id="raysubmit_old")
    assert (stale.rows_done, stale.rows_failed, stale.rows_total) == (5, 0, 50)


def test_records_never_hold_aws_secrets(store: JobStore, s3_endpoint: str) -> None:
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    job, _ = store.create(spec(idempotency_key="k"))
    store.claim(job.job_id, "raysubmit_a")
    for name in storage.list_names(storage.join(store.root, "jobs")):
        assert secret not in storage.read_bytes(storage.join(store.root, "jobs", name)).decode()
    for name in storage.list_names(storage.join(store.root, "keys")):
        assert secret not in storage.read_bytes(storage.join(store.root, "keys", name)).decode()


def test_default_store_follows_batchinf_store_else_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHINF_STORE", "s3://ops/batchinf")
    assert default_store_uri() == "s3://ops/batchinf"
    monkeypatch.delenv("BATCHINF_STORE")
    monkeypatch.setenv("HOME", "/home/ops")
    assert default_store_uri() == "/home/ops/.batchinf"
    assert JobStore.from_uri("~/jobs").root == "/home/ops/jobs"
