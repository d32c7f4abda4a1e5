"""The job record and its one door for state changes (pure logic: no storage)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from batchinf.errors import IllegalTransition
from batchinf.job import (
    HISTORY_KEPT,
    TRANSITIONS,
    Job,
    JobSpec,
    JobState,
    check_transition,
    fail,
    new_job_id,
    refuse_launch,
    retry_delay,
    retry_later,
    transition,
)
from batchinf.settings import Settings

LEGAL = [(old, new) for old, targets in TRANSITIONS.items() for new in sorted(targets)]  # a stable order
ILLEGAL = [(old, new) for old in JobState for new in JobState if (old, new) not in LEGAL]


def make_job(**spec: Any) -> Job:
    return Job.new(JobSpec(manifest="m.csv", model="model", output="out", **spec), now=1000.0)


def test_stored_keys_are_pinned_so_old_records_stay_readable() -> None:
    data = make_job().to_dict()
    assert sorted(data) == [
        "attempt", "attempts", "attempts_dropped", "cancel_requested", "created_at",
        "drift_alert", "ended_at", "error", "images_per_s", "job_id", "launch_error",
        "launch_refusals", "ray_address", "ray_job_id", "retry_at", "rows_done", "rows_failed",
        "rows_total", "runner", "spec", "started_at", "state", "summary", "updated_at", "waiting",
    ]  # fmt: skip
    assert sorted(data["spec"]) == [
        "allowed_buckets", "batch_size", "challenger", "challenger_version", "cpus_per_replica",
        "decode_cpus", "gpus_per_replica", "idempotency_key", "include", "incremental",
        "manifest", "max_drift_psi", "max_error_rate", "memory_per_replica", "model",
        "model_version", "name", "output", "outputs", "priority", "replica_resources",
        "replicas_max", "replicas_min", "shard_size", "top_k",
    ]  # fmt: skip


def test_record_round_trips_through_json() -> None:
    job = fail(transition(make_job(top_k=3), JobState.RUNNING, now=1001.0), "OSError", "disk")
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job


def test_a_record_without_the_newer_keys_still_reads() -> None:
    job = make_job()
    data = job.to_dict()
    for key in ("attempts", "retry_at", "waiting"):
        del data[key]
    del data["spec"]["replica_resources"]
    del data["spec"]["allowed_buckets"]
    assert Job.from_dict(data) == job


def test_each_attempt_that_ends_is_kept_with_its_reason() -> None:
    running = transition(make_job(), JobState.RUNNING, now=1001.0)
    requeued = retry_later(running, "InfrastructureError: node lost", 10.0, now=1002.0)
    assert requeued.state is JobState.QUEUED and requeued.retry_at == 1012.0
    failed = fail(transition(requeued, JobState.RUNNING, now=1020.0), "ModelError", "bad model")
    assert [(a["attempt"], a["outcome"]) for a in failed.attempts] == [(1, "requeued"), (2, "failed")]
    assert failed.attempts[0]["reason"] == "InfrastructureError: node lost"


def test_from_dict_ignores_keys_written_by_a_newer_version() -> None:
    job = make_job()
    data = job.to_dict()
    data["from_the_future"] = 1
    data["spec"]["also_new"] = True
    assert Job.from_dict(data) == job


def test_state_values_are_the_upper_case_names_and_terminal_is_the_last_three() -> None:
    assert [s.value for s in JobState] == [s.name for s in JobState]
    assert {s for s in JobState if s.terminal} == {"SUCCEEDED", "FAILED", "CANCELLED"}


@pytest.mark.parametrize(("old", "new"), LEGAL)
def test_legal_transitions_pass(old: JobState, new: JobState) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(("old", "new"), ILLEGAL)
def test_illegal_transitions_raise(old: JobState, new: JobState) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(old, new)


def test_succeeded_is_final_and_running_cannot_be_claimed_again() -> None:
    assert TRANSITIONS[JobState.SUCCEEDED] == frozenset()
    running = transition(make_job(), JobState.RUNNING)
    with pytest.raises(IllegalTransition):
        transition(running, JobState.RUNNING)


def test_each_run_is_a_new_attempt_with_its_own_start_time() -> None:
    first = transition(make_job(), JobState.RUNNING, now=1001.0)
    second = transition(transition(first, JobState.QUEUED), JobState.RUNNING, now=1005.0)
    assert (first.attempt, first.started_at) == (1, 1001.0)
    assert (second.attempt, second.started_at) == (2, 1005.0)


def test_fail_records_type_message_and_attempt() -> None:
    running = transition(make_job(), JobState.RUNNING)
    failed = fail(running, "ModelError", "no signature", now=1009.0)
    assert failed.state is JobState.FAILED
    assert failed.error == {"type": "ModelError", "message": "no signature", "attempt": 1}
    assert failed.ended_at == 1009.0


def test_fail_of_a_finished_job_is_illegal() -> None:
    done = transition(transition(make_job(), JobState.RUNNING), JobState.SUCCEEDED)
    with pytest.raises(IllegalTransition):
        fail(done, "RuntimeError", "late")


def test_resume_clears_the_last_error_and_end_time() -> None:
    failed = fail(transition(make_job(), JobState.RUNNING), "OSError", "disk")
    resumed = transition(failed, JobState.QUEUED)
    assert (resumed.state, resumed.error, resumed.ended_at) == (JobState.QUEUED, None, None)
    assert resumed.attempt == 1


def test_requeue_keeps_a_pending_cancel_request() -> None:
    running = transition(make_job(), JobState.RUNNING)
    running.cancel_requested = True
    assert transition(running, JobState.QUEUED).cancel_requested is True


def test_new_job_id_is_readable_utc_and_sortable() -> None:
    job_id = new_job_id(1795296600.0)  # 2026-11-21 21:30:00 UTC
    assert re.fullmatch(r"bi-20261121-213000-[0-9a-f]{6}", job_id)
    assert new_job_id(1795296600.0) < new_job_id(1795296601.0)


def test_a_refused_launch_backs_off_doubling_without_history_then_fails() -> None:
    job, delays = make_job(), []
    for n in range(1, 5):
        running = transition(job, JobState.RUNNING, now=2000.0)
        running.ray_job_id = f"{job.job_id}-a1"
        job = refuse_launch(running, running.ray_job_id, "HTTP 500", now=2000.0)
        assert (job.state, job.attempt, job.attempts) == (JobState.QUEUED, 0, [])
        assert (job.launch_refusals, job.launch_error) == (n, "HTTP 500")
        delays.append(job.retry_at - 2000.0)
    assert delays == [15.0, 30.0, 60.0, 120.0]
    running = transition(job, JobState.RUNNING)
    running.ray_job_id = "x-a1"
    failed = refuse_launch(running, "x-a1", "HTTP 500")
    assert failed.state is JobState.FAILED and failed.error["type"] == "LaunchRefused"
    assert "refused by the cluster 5 times in a row: HTTP 500" in failed.error["message"]
    assert len(failed.attempts) == 1


def test_the_settings_set_the_back_offs_and_the_refusals_allowed() -> None:
    knobs = Settings(launch_backoff=2.0, launch_refusals=2, retry_delay=1.0)
    running = transition(make_job(), JobState.RUNNING, now=2000.0)
    running.ray_job_id = "x-a1"
    job = refuse_launch(running, "x-a1", "HTTP 500", settings=knobs, now=2000.0)
    assert (job.state, job.retry_at) == (JobState.QUEUED, 2002.0)
    running = transition(job, JobState.RUNNING)
    running.ray_job_id = "x-a1"
    assert refuse_launch(running, "x-a1", "HTTP 500", settings=knobs).state is JobState.FAILED
    assert [retry_delay(n, knobs) for n in (1, 2, 3, 10)] == [1.0, 2.0, 4.0, 300.0]
    assert [retry_delay(n) for n in (1, 2, 3, 10)] == [15.0, 30.0, 60.0, 300.0]


def test_a_refusal_for_another_attempt_changes_nothing() -> None:
    running = transition(make_job(), JobState.RUNNING)
    running.ray_job_id = "job-a2"
    assert refuse_launch(running, "job-a1", "late answer") is running


def test_the_attempt_history_keeps_the_newest_entries_and_counts_the_rest() -> None:
    job = make_job()
    for _ in range(HISTORY_KEPT + 7):
        job = transition(transition(job, JobState.RUNNING), JobState.QUEUED, reason="node lost")
    assert len(job.attempts) == HISTORY_KEPT and job.attempts_dropped == 7
    assert job.attempts[-1]["attempt"] == HISTORY_KEPT + 7
    assert len(json.dumps(job.to_dict())) < 8000
