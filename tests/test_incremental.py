"""Incremental nights on a listed folder: each night scores only what is new, changed or failed
before; the newest prediction of every URI is one DuckDB query over the ledger; pruned records
and moved outputs change nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import duckdb
import pyarrow.parquet as pq
import pytest

from batchinf.attempt import execute
from batchinf.job import JobSpec, JobState
from batchinf.jobstore import JobStore
from tests.models import write_solid_image

NEWEST = """
    SELECT uri, top1_label, job_id FROM read_parquet('{ledger}/*.parquet')
    QUALIFY row_number() OVER (PARTITION BY uri ORDER BY scored_at DESC, job_id DESC) = 1
    ORDER BY uri
"""


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        write_solid_image(str(folder / f"{i}.png"), colour)
    (folder / "bad.png").write_bytes(b"not an image")
    return folder


def night(store: JobStore, photos, image_model, out: str, n: int) -> dict:
    spec = JobSpec(str(photos), image_model, out, name="nightly", incremental=True,
                   idempotency_key=f"nightly-2026-12-0{n}", shard_size=3)
    job, _ = store.create(spec)
    done = execute(store, job.job_id, f"local-{job.job_id}")
    assert done.state is JobState.SUCCEEDED, done.error
    return {"job": done, "rows": {r["uri"]: r for r in pq.read_table(out).to_pylist()}}


def test_each_night_scores_only_new_changed_and_failed_rows(ray_local, image_model, photos, tmp_path):
    store = JobStore.from_uri(str(tmp_path / "store"))
    first = night(store, photos, image_model, str(tmp_path / "out1"), 1)
    assert len(first["rows"]) == 7 and first["job"].summary["rows_skipped"] == 0
    write_solid_image(str(photos / "new-a.png"), (10, 200, 90))
    write_solid_image(str(photos / "new-b.png"), (128, 128, 128))
    write_solid_image(str(photos / "2.png"), (250, 120, 5))  # changed content
    os.utime(photos / "2.png", (2_000_000_000, 2_000_000_000))
    second = night(store, photos, image_model, str(tmp_path / "out2"), 2)
    names = sorted(os.path.basename(u) for u in second["rows"])
    assert names == ["2.png", "bad.png", "new-a.png", "new-b.png"]  # this night's rows only
    summary = second["job"].summary
    assert (summary["rows_total"], summary["rows_skipped"], summary["rows_ok"]) == (9, 5, 3)
    assert "earlier night of nightly" in summary["incremental"]["why"]
    assert second["job"].rows_done == 9
    newest = duckdb.sql(NEWEST.format(ledger=tmp_path / "store" / "ledger" / "nightly")).fetchall()
    by_name = {os.path.basename(uri): (label, job) for uri, label, job in newest}
    assert len(by_name) == 9 and by_name["2.png"][1] == second["job"].job_id
    assert by_name["0.png"][1] == first["job"].job_id
    assert by_name["2.png"][0] == second["rows"][str(photos / "2.png")]["top1_label"]
    latest = subprocess.run(
        [sys.executable, "-m", "batchinf.cli", "latest", "nightly", "--store", store.root, "--json"],
        capture_output=True, text=True, timeout=120, check=True)
    rows = {os.path.basename(r["uri"]): r["job_id"] for r in json.loads(latest.stdout)["rows"]}
    assert rows == {name: job for name, (_, job) in by_name.items()}

    store.prune(0)  # history pruned, outputs moved: the ledger alone decides
    shutil.move(str(tmp_path / "out1"), str(tmp_path / "archive1"))
    third = night(store, photos, image_model, str(tmp_path / "out3"), 3)
    assert third["job"].summary["rows_skipped"] == 8 and list(third["rows"]) == [str(photos / "bad.png")]
