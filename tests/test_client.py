"""The library client end to end: real SavedModels, the session's real local Ray, real Parquet.

Jobs run here run in this test process, on the session's Ray (``ensure_ray`` joins the Ray this
process is connected to), as ``submit --wait`` runs them in its own.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batchinf.client import Client
from batchinf.dispatcher import Dispatcher
from batchinf.errors import BatchinfError, JobNotFound, ManifestError, UsageError
from batchinf.job import JobState, local_run_id
from tests.models import expected_topk

NO_CLUSTER = "http://127.0.0.1:9"  # a cluster address nothing answers: jobs only queue


def test_a_job_submitted_to_run_here_is_held_from_its_creation_and_writes_parquet(
    ray_local: Any, image_model: str, colour_images: tuple[str, list], tmp_path: Path
) -> None:
    manifest, colours = colour_images
    client = Client(store=str(tmp_path / "store"))
    submitted = client.enqueue(client.build_spec(manifest, model=image_model,
                                                 output=str(tmp_path / "out"), top_k=2),
                               wait=True)
    job_id = submitted.job.job_id
    assert submitted.runs_here and submitted.created
    created = client.status(job_id)
    assert created.state is JobState.RUNNING and created.ray_job_id == local_run_id(job_id, 1)
    assert created.runner == {"host": socket.gethostname(), "pid": os.getpid()}

    # What a dispatcher does with a queued job, it cannot do with this one: there is no race
    # between the submitter and a dispatcher for a job the submitter runs itself.
    assert client.store.claim(job_id, f"{job_id}-a1") is None
    assert Dispatcher(client.store, None).tick() == []

    seen: list[int] = []
    job = client.finish(submitted, on_progress=lambda p: seen.append(p.rows_done))
    assert job.state is JobState.SUCCEEDED and job.ray_job_id == local_run_id(job_id, 1)
    assert job.attempt == 1 and seen and seen[-1] == 12
    table = pq.read_table(str(tmp_path / "out")).sort_by("id").to_pylist()
    assert len(table) == 12 and job.summary is not None and job.summary["rows_ok"] == 12
    for row, colour in zip(table, colours, strict=True):
        label, score = expected_topk(colour, 1)[0]
        assert row["top1_label"] == label and row["top1_score"] == pytest.approx(score, abs=1e-5)


def test_status_cancel_and_resume_of_a_queued_job_then_run_here(
    ray_local: Any, image_model: str, colour_images: tuple[str, list], tmp_path: Path
) -> None:
    store, output = str(tmp_path / "store"), str(tmp_path / "out")
    queueing = Client(store=store, address=NO_CLUSTER)  # its dispatcher would take the job later
    job = queueing.submit(colour_images[0], model=image_model, output=output)
    assert job.state is JobState.QUEUED and queueing.status(job.job_id) == job
    assert not queueing.wait(job.job_id, timeout=0.2).state.terminal  # nobody runs it

    assert queueing.cancel(job.job_id).state is JobState.CANCELLED
    assert queueing.resume(job.job_id).state is JobState.QUEUED
    assert queueing.resume(job.job_id).state is JobState.QUEUED  # already queued: as it is

    here = Client(store=store)
    done = here.run_here(job.job_id)
    assert done.state is JobState.SUCCEEDED and done.ray_job_id == local_run_id(job.job_id, 1)
    assert pq.read_table(output).num_rows == 12
    with pytest.raises(UsageError, match="SUCCEEDED; only FAILED, CANCELLED"):
        here.resume(job.job_id)
    jobs, more = here.jobs({JobState.SUCCEEDED})
    assert [j.job_id for j in jobs] == [job.job_id] and more is None


@pytest.mark.parametrize(
    ("options", "error", "names"),
    [
        ({"top_k": 0}, UsageError, "--top-k"),
        ({"replicas": "3:1"}, UsageError, "--replicas"),
        ({"no_such_option": 1}, UsageError, "no_such_option"),
        ({"model": None}, UsageError, "--model"),
        ({"manifest": "missing.csv"}, ManifestError, "missing.csv"),
    ],
)
def test_a_bad_argument_raises_a_batchinf_error_and_creates_no_job(
    image_model: str, colour_images: tuple[str, list], tmp_path: Path,
    options: dict[str, Any], error: type[BatchinfError], names: str
) -> None:
    client = Client(store=str(tmp_path / "store"), address=NO_CLUSTER)
    given = {"model": image_model, "output": str(tmp_path / "out")} | options
    source = str(tmp_path / given.pop("manifest", colour_images[0]))
    with pytest.raises(error, match=names):
        client.submit(source, **given)
    assert client.store.list() == []
    with pytest.raises(JobNotFound):
        client.status("bi-20260101-000000-000000")


def _nightly() -> Any:
    """examples/nightly.py, imported from its file (examples/ is no package)."""
    path = Path(__file__).parents[1] / "examples" / "nightly.py"
    spec = importlib.util.spec_from_file_location("nightly_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_nightly_example_exits_0_on_success_and_3_for_a_cancelled_night(
    ray_local: Any, image_model: str, colour_images: tuple[str, list], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nightly = _nightly()
    store = str(tmp_path / "store")
    monkeypatch.setenv("BATCHINF_STORE", store)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = tmp_path / "night.yaml"
    spec.write_text(f"name: night\nmanifest: {colour_images[0]}\nmodel: {image_model}\n"
                    f"output: {tmp_path}/out/{{date}}/\n")
    assert nightly.main([str(spec), "--date", "2026-11-21"]) == 0
    assert "12 rows scored, 0 failed" in capsys.readouterr().out
    assert pq.read_table(str(tmp_path / "out" / "2026-11-21")).num_rows == 12

    # A night queued for a cluster and cancelled there: the wrapper's submit of that night
    # returns the same job (the spec's idempotency key), and it fails with the CLI's exit code.
    queued = Client(store=store, address=NO_CLUSTER).submit(str(spec), date="2026-11-22")
    Client(store=store).cancel(queued.job_id)
    assert nightly.main([str(spec), "--date", "2026-11-22"]) == 3
    assert f"job {queued.job_id} CANCELLED" in capsys.readouterr().err
