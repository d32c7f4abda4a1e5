"""Launches the cluster refuses: back-off with the reason shown, a bounded number of tries, and
a submission whose answer was lost adopted, on a real Ray head behind a refusing proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from batchinf.client import waiting_line
from batchinf.dispatcher import Dispatcher
from batchinf.job import JobSpec, JobState
from batchinf.jobstore import JobStore
from bench.jobsproxy import JobsProxy
from tests.conftest import drive


@pytest.fixture()
def proxy(ray_head):
    with JobsProxy(ray_head.jobs_address) as proxy:
        yield proxy


@pytest.fixture()
def store(tmp_path) -> JobStore:
    return JobStore.from_uri(str(tmp_path / "store"))


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setenv("BATCHINF_LAUNCH_BACKOFF", "0.5")
    monkeypatch.delenv("BATCHINF_LAUNCH_REFUSALS", raising=False)


def test_refused_launches_back_off_say_why_and_then_run_exactly_once(
    proxy, store, image_model, colour_images, tmp_path, monkeypatch
):
    manifest, colours = colour_images
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # Ray would prefer it to the address
    dispatcher = Dispatcher(store, proxy.address)
    job, _ = store.create(JobSpec(manifest, image_model, str(tmp_path / "out")))
    proxy.refuse(3)
    assert dispatcher.tick() == []
    refused = store.get(job.job_id)
    assert (refused.state, refused.attempt, refused.launch_refusals) == (JobState.QUEUED, 0, 1)
    assert refused.retry_at - refused.updated_at == pytest.approx(0.5, abs=0.2)
    line = waiting_line(refused)
    assert line.startswith("launch refused by the cluster: ") and "500" in line
    assert dispatcher.tick() == []  # backing off: not tried again yet
    assert proxy.counts["refuse"] == 1
    done = drive(dispatcher, job.job_id, every=0.5)
    assert done.state is JobState.SUCCEEDED and proxy.counts["refuse"] == 3
    assert (done.attempt, done.launch_refusals, done.launch_error) == (1, 0, None)
    assert [a["outcome"] for a in done.attempts] == ["succeeded"]  # refusals add no history
    rows = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert len(rows) == len(colours)


def test_a_launch_refused_every_time_fails_the_job_and_wait_exits_non_zero(
    proxy, store, image_model, colour_images, tmp_path
):
    manifest, _ = colour_images
    dispatcher = Dispatcher(store, proxy.address)
    job, _ = store.create(JobSpec(manifest, image_model, str(tmp_path / "out")))
    proxy.refuse()
    failed = drive(dispatcher, job.job_id, timeout=60, every=0.5)
    assert failed.state is JobState.FAILED and failed.error["type"] == "LaunchRefused"
    assert failed.error["message"].startswith("launch refused by the cluster 5 times in a row: ")
    assert proxy.counts["refuse"] == 5 and len(json.dumps(failed.to_dict())) < 6000
    waited = subprocess.run(
        [sys.executable, "-m", "batchinf.cli", "wait", job.job_id, "--store", store.root],
        capture_output=True, text=True, env=dict(os.environ), timeout=60,
    )
    assert waited.returncode == 1
    assert f"batchinf: job {job.job_id} FAILED: LaunchRefused: launch refused" in waited.stderr


def test_a_launch_whose_answer_was_lost_is_adopted_not_refused(
    proxy, store, image_model, colour_images, tmp_path
):
    manifest, colours = colour_images
    dispatcher = Dispatcher(store, proxy.address)
    job, _ = store.create(JobSpec(manifest, image_model, str(tmp_path / "out")))
    proxy.refuse(1, mode="lose")
    assert dispatcher.tick() == [f"{job.job_id}-a1"]
    done = drive(dispatcher, job.job_id, every=0.5)
    assert proxy.counts["lose"] == 1
    assert (done.state, done.attempt, done.launch_refusals) == (JobState.SUCCEEDED, 1, 0)
    assert len(pq.read_table(str(tmp_path / "out")).to_pylist()) == len(colours)
