"""Storage faults through the project's fault-injecting proxy (``bench/faultproxy.py``) in front
of moto's server: 503 SlowDown, 500, resets before a reply and mid-body, lost replies after a
write landed, stalls, and 403. Transient faults must cost nothing; permanent ones one row."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from batchinf import manifest, storage
from batchinf.decode import RowProblem, fetch
from batchinf.errors import NotFoundError, PreconditionFailed, TooLarge
from batchinf.job import JobSpec, JobState
from batchinf.jobstore import JobStore
from batchinf.settings import Settings
from bench.faultproxy import FAULTS, FaultProxy
from tests.conftest import write_manifest
from tests.models import write_solid_image

MIXED = {fault: 0.05 for fault in FAULTS}  # 30% of requests meet one of the six


@pytest.fixture()
def through(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FaultProxy]]:
    """Point this process's S3 client at a new fault proxy in front of moto."""
    made: list[FaultProxy] = []

    def make(**options: object) -> FaultProxy:
        proxy = FaultProxy(s3_endpoint, **options)  # type: ignore[arg-type]
        made.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        storage.configure(Settings(s3_read_timeout=1.0))  # a new client, for the proxy
        return proxy

    yield make
    storage.configure(None)  # the next client is made for the endpoint restored by monkeypatch
    for proxy in made:
        proxy.close()


def test_reads_ride_through_every_transient_fault(bucket, through):
    objects = {f"s3://{bucket}/o/{i}.bin": os.urandom(2000 + i) for i in range(80)}
    for uri, data in objects.items():
        storage.write_bytes(uri, data)
    proxy = through(rates=MIXED, seed=11, stall_s=1.5)
    assert {uri: storage.read_bytes(uri) for uri in objects} == objects
    assert storage.list_names(f"s3://{bucket}/o") == sorted(f"{i}.bin" for i in range(80))
    assert storage.exists(f"s3://{bucket}/o/3.bin") and not storage.exists(f"s3://{bucket}/o/x")
    assert all(proxy.counts[fault] > 0 for fault in FAULTS), proxy.counts


def test_a_whole_object_read_is_one_presigned_get_that_agrees_with_get_object(bucket, through):
    uri, data = f"s3://{bucket}/img/a.bin", os.urandom(5000)
    etag = storage.write_bytes(uri, data)
    proxy = through(remember=(f"/{bucket}/img/",))
    s3 = storage.s3_backend()
    assert s3.presigned_get(uri, None) == (data, etag)
    assert list(proxy.remembered) == [f"/{bucket}/img/a.bin"]  # signed in its query, no Range
    assert storage.s3_client().get_object(Bucket=bucket, Key="img/a.bin")["ETag"] == etag
    with pytest.raises(TooLarge):  # from Content-Length, before the body
        s3.presigned_get(uri, 4999)
    # Anything but a 200 is get_object's to answer: its error is the one raised.
    assert s3.presigned_get(f"s3://{bucket}/img/none", None) is None
    with pytest.raises(NotFoundError):
        storage.read_bytes(f"s3://{bucket}/img/none")
    assert storage.read_with_etag(uri) == (data, etag)


def test_a_conditional_write_whose_reply_was_lost_is_no_conflict_and_no_second_write(bucket, through):
    proxy = through(rates={"lost_reply": 0.5}, seed=5)
    for i in range(12):
        storage.write_bytes(f"s3://{bucket}/r/{i}", b"first %d" % i, if_none_match=True)
    with pytest.raises(PreconditionFailed):  # a real conflict is still one
        storage.write_bytes(f"s3://{bucket}/r/0", b"someone else", if_none_match=True)
    data, etag = storage.read_with_etag(f"s3://{bucket}/r/1")
    new_etag = storage.write_bytes(f"s3://{bucket}/r/1", b"second", if_match=etag)
    assert storage.read_with_etag(f"s3://{bucket}/r/1") == (b"second", new_etag)
    with pytest.raises(PreconditionFailed):  # a stale etag is still refused
        storage.write_bytes(f"s3://{bucket}/r/1", b"third", if_match=etag)
    assert storage.read_bytes(f"s3://{bucket}/r/1") == b"second"
    assert proxy.counts["lost_reply"] >= 4, proxy.counts


def test_the_job_store_keeps_one_true_record_under_faults(bucket, through, tmp_path):
    through(rates={**MIXED, "lost_reply": 0.15}, seed=2, stall_s=1.5)
    store = JobStore.from_uri(f"s3://{bucket}/store")
    job, created = store.create(JobSpec("m.csv", "model", str(tmp_path / "out"),
                                        idempotency_key="nightly-1"))
    again, created_again = store.create(JobSpec("m.csv", "model", str(tmp_path / "out"),
                                                idempotency_key="nightly-1"))
    assert created and not created_again and again.job_id == job.job_id
    for n in range(1, 16):
        store.update(job.job_id, lambda j, n=n: _with_rows(j, n))
    assert store.get(job.job_id).rows_done == 15
    assert [j.job_id for j in store.list()] == [job.job_id]


def _with_rows(job, n):
    from dataclasses import replace

    return replace(job, rows_done=n)


def test_a_long_manifest_survives_bodies_cut_midway(bucket, through, tmp_path):
    rows = [[f"s3://{bucket}/img/{i:05d}.png", "x" * 40] for i in range(3000)]
    path = write_manifest(tmp_path / "m.csv", ["uri", "note"], rows)
    with open(path, "rb") as f:
        storage.write_bytes(f"s3://{bucket}/m.csv", f.read())
    proxy = through(rates={"reset_body": 0.5, "slowdown": 0.2}, seed=9)
    read = [list(row) for shard in manifest.iter_shards(f"s3://{bucket}/m.csv", 500)
            for row in shard.rows]
    assert read == rows and proxy.counts["reset_body"] > 0


def test_permanent_faults_become_one_clear_row_error_in_bounded_time(bucket, through):
    for name in ("secret.png", "broken.png"):
        storage.write_bytes(f"s3://{bucket}/{name}", b"\x89PNG")
    through(forbid={"secret.png"})
    with pytest.raises(RowProblem) as denied:
        fetch(f"s3://{bucket}/secret.png")
    assert denied.value.kind == "access_denied"
    through(rates={"internal": 1.0})
    started = time.monotonic()
    with pytest.raises(RowProblem) as failed:
        fetch(f"s3://{bucket}/broken.png")
    assert failed.value.kind == "fetch_error" and time.monotonic() - started < 15


def test_a_whole_job_on_s3_through_faults_loses_no_row_and_writes_none_twice(
    s3_endpoint, bucket, image_model, tmp_path
):
    colours = [(255, 0, 0), (0, 0, 255), (10, 200, 90), (128, 128, 128)]
    for i in range(60):
        write_solid_image(str(tmp_path / "img" / f"{i}.png"), colours[i % 4])
    storage.upload_folder(str(tmp_path / "img"), f"s3://{bucket}/img")
    storage.upload_folder(image_model, f"s3://{bucket}/model")
    storage.write_bytes(f"s3://{bucket}/img/secret.png", (tmp_path / "img" / "0.png").read_bytes())
    rows = [[f"s3://{bucket}/img/{i}.png", str(i)] for i in range(60)]
    rows.insert(30, [f"s3://{bucket}/img/secret.png", "denied"])
    local = write_manifest(tmp_path / "m.csv", ["uri", "n"], rows)
    storage.write_bytes(f"s3://{bucket}/m.csv", open(local, "rb").read())  # noqa: SIM115
    output = f"s3://{bucket}/out"
    with FaultProxy(s3_endpoint, rates=MIXED, seed=4, stall_s=1.5, forbid={"secret.png"}) as proxy:
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
               "AWS_ENDPOINT_URL": proxy.endpoint, "BATCHINF_S3_READ_TIMEOUT": "1",
               # One request in three meets a fault here, a thousand times S3's rate. At six
               # tries a call runs out with odds 0.3**6, which over the job's ~250 calls made
               # by concurrent workers (so in no fixed order) failed one run in ~7. Ten tries
               # leave odds of 0.3**10 a call: the test is about rows, not the try budget.
               "BATCHINF_S3_ATTEMPTS": "10",
               "BATCHINF_STORE": f"s3://{bucket}/store", "HOME": str(tmp_path)}
        done = subprocess.run(
            [sys.executable, "-m", "batchinf.cli", "submit", f"s3://{bucket}/m.csv", "--model",
             f"s3://{bucket}/model", "--output", output, "--batch-size", "8", "--shard-size", "16",
             "--wait", "--json"],
            env=env, capture_output=True, text=True, timeout=600)
        faults = sum(proxy.counts[f] for f in FAULTS)
    assert done.returncode == 0, done.stderr[-3000:]
    import io

    import pyarrow.parquet as pq

    parts = sorted(n for n in storage.list_names(output) if n.endswith(".parquet"))
    table = [r for n in parts for r in pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/{n}"))).to_pylist()]
    assert [r["n"] for r in table] == [row[1] for row in rows]  # every row, once, in order
    assert [r["error_kind"] for r in table if r["error_kind"]] == ["access_denied"]
    assert JobStore.from_uri(f"s3://{bucket}/store").list()[0].state is JobState.SUCCEEDED
    assert faults >= 20, proxy.counts


def test_an_output_the_credentials_may_not_write_fails_before_any_replica(bucket, through,
                                                                          image_model, tmp_path):
    from batchinf.errors import UsageError
    from batchinf.pipeline import run_job

    manifest_uri = write_manifest(tmp_path / "m.csv", ["uri"], [["a.png"]])
    through(forbid={"/locked-out/"})
    output = f"s3://{bucket}/locked-out/run1"
    with pytest.raises(UsageError, match=f"cannot write to the output {output}: access denied"):
        run_job("job-denied", JobSpec(manifest_uri, image_model, output))
