"""Whole jobs on a real local Ray instance with real SavedModels, read back from Parquet."""

from __future__ import annotations

import io
import json
import os

import pyarrow.parquet as pq
import pytest

from batchinf import storage
from batchinf.errors import JobFailed, UsageError
from batchinf.job import JobSpec
from batchinf.pipeline import run_job
from tests.conftest import write_manifest
from tests.models import expected_topk, make_image_model, write_solid_image


def _read(output: str) -> list[dict]:
    return pq.read_table(output).to_pylist()


def _topk(row: dict) -> list[tuple[str, float]]:
    return [(p["label"], p["score"]) for p in row["predictions"]]


def _assert_exact(rows: list[dict], colours: list, k: int) -> None:
    assert len(rows) == len(colours)
    for row, colour in zip(rows, colours, strict=True):
        expected = expected_topk(colour, k)
        assert [label for label, _ in _topk(row)] == [label for label, _ in expected]
        assert [score for _, score in _topk(row)] == pytest.approx([s for _, s in expected], abs=1e-5)
        assert [p["rank"] for p in row["predictions"]] == list(range(1, k + 1))


def test_exact_topk_and_pass_through_columns(ray_local, image_model, colour_images, tmp_path):
    manifest, colours = colour_images
    output = str(tmp_path / "out")
    result = run_job("job-a", JobSpec(manifest, image_model, output, top_k=3, batch_size=5, shard_size=4))
    rows = _read(output)
    _assert_exact(rows, colours, 3)
    assert [r["id"] for r in rows] == [f"{i:03d}" for i in range(12)]
    assert rows[3]["note"] == "note, 3" and rows[3]["uri"] == "img/3.png"
    assert {(r["model_name"], r["model_version"], r["job_id"]) for r in rows} == {("colour", "2", "job-a")}
    assert rows[0]["top1_label"] == _topk(rows[0])[0][0] and rows[0]["error"] is None
    assert sorted(storage.list_names(output)) == [
        "_SUCCESS", "_report.html", "_summary.json", "part-00000.parquet", "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert result.summary["rows_ok"] == 12 and result.summary["rows_failed"] == 0
    timing = result.summary
    assert timing["startup_seconds"] > 0 and timing["seconds"] > 0
    assert 0 < timing["first_part_seconds"] <= timing["startup_seconds"] + timing["seconds"] + 1
    assert 0 < timing["model_busy"] <= 1  # 3 batches of the model over the processing time
    assert timing["resources"]["max_in_flight"] >= 3
    # All three batches were fetched and decoded while the replica was still loading the model.
    assert timing["batches_decoded_before_model"] == 3


def test_model_version_picks_the_asked_version(ray_local, image_model, colour_images, tmp_path):
    manifest, _ = colour_images
    run_job("job-v", JobSpec(manifest, image_model, str(tmp_path / "o"), model_version=1))
    assert {r["model_version"] for r in _read(str(tmp_path / "o"))} == {"1"}


def test_bad_rows_get_errors_and_the_job_goes_on(ray_local, image_model, tmp_path):
    good = write_solid_image(str(tmp_path / "good.png"), (255, 0, 0))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"hello")
    jpeg = io.BytesIO()
    __import__("PIL.Image").Image.new("RGB", (300, 200), (1, 2, 3)).save(jpeg, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpeg.getvalue()[:400])
    names = [good, "missing.png", "empty.jpg", "cut.jpg", "text.jpg", good]
    manifest = write_manifest(tmp_path / "m.csv", ["uri"], [[n] for n in names])
    result = run_job("job-bad", JobSpec(manifest, image_model, str(tmp_path / "out"), batch_size=4))
    rows = _read(str(tmp_path / "out"))
    assert [r["error_kind"] for r in rows] == [None, "not_found", "empty", "corrupt_image", "not_an_image", None]
    assert all(r["error"] for r in rows[1:5]) and rows[1]["predictions"] is None
    assert result.summary["errors_by_kind"] == {"corrupt_image": 1, "empty": 1, "not_an_image": 1, "not_found": 1}


def test_string_signature_gets_encoded_bytes(ray_local, bytes_model, colour_images, tmp_path):
    manifest, colours = colour_images
    run_job("job-bytes", JobSpec(manifest, bytes_model, str(tmp_path / "out"), top_k=5, batch_size=4))
    rows = _read(str(tmp_path / "out"))
    _assert_exact(rows, colours, 5)
    assert {r["model_version"] for r in rows} == {None}


def test_manifest_model_images_and_output_on_s3(ray_local, image_model, bucket, tmp_path):
    colours = [(255, 0, 0), (0, 0, 255), (10, 200, 90)]
    for i, colour in enumerate(colours):
        write_solid_image(str(tmp_path / "img" / f"{i}.png"), colour)
    storage.upload_folder(str(tmp_path / "img"), f"s3://{bucket}/data/img")
    storage.upload_folder(image_model, f"s3://{bucket}/models/colour")
    rows = [[f"s3://{bucket}/data/img/0.png"], ["img/1.png"], [f"s3://{bucket}/data/img/2.png"]]
    local_manifest = write_manifest(tmp_path / "m.csv", ["uri"], rows)
    with open(local_manifest, "rb") as f:
        storage.write_bytes(f"s3://{bucket}/data/m.csv", f.read())
    output = f"s3://{bucket}/results/run1"
    spec = JobSpec(f"s3://{bucket}/data/m.csv", f"s3://{bucket}/models/colour", output, top_k=2)
    run_job("job-s3", spec)
    _assert_exact(_read_s3(output), colours, 2)
    summary = json.loads(storage.read_bytes(f"{output}/_summary.json"))
    assert summary["rows_total"] == 3 and storage.exists(f"{output}/_SUCCESS")


def _read_s3(output: str) -> list[dict]:
    parts = sorted(n for n in storage.list_names(output) if n.endswith(".parquet"))
    rows: list[dict] = []
    for name in parts:
        rows += pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/{name}"))).to_pylist()
    return rows


def test_two_replicas_filling_the_machine_do_not_hang(ray_local, image_model, colour_images, tmp_path):
    manifest, colours = colour_images
    spec = JobSpec(manifest, image_model, str(tmp_path / "out"), batch_size=2, replicas_min=2,
                   replicas_max=2, cpus_per_replica=1.0)
    run_job("job-2r", spec)
    assert len(_read(str(tmp_path / "out"))) == len(colours)


def test_error_budget_fails_the_job_and_writes_no_success(ray_local, image_model, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", ["uri"], [["a.png"], ["b.png"], ["c.png"]])
    with pytest.raises(JobFailed, match="over the error budget"):
        run_job("job-budget", JobSpec(manifest, image_model, str(tmp_path / "out"), max_error_rate=0.5))
    assert not os.path.exists(tmp_path / "out" / "_SUCCESS")


def test_a_stop_request_leaves_no_success_marker(ray_local, image_model, colour_images, tmp_path):
    manifest, _ = colour_images
    result = run_job("job-stop", JobSpec(manifest, image_model, str(tmp_path / "out"), batch_size=1),
                     should_stop=lambda: True)
    assert result.cancelled and not os.path.exists(tmp_path / "out" / "_SUCCESS")


def test_an_output_holding_another_jobs_parts_is_refused(ray_local, image_model, colour_images, tmp_path):
    manifest, _ = colour_images
    spec = JobSpec(manifest, image_model, str(tmp_path / "out"), shard_size=4)
    run_job("job-first", spec)
    with pytest.raises(UsageError, match="already holds results of job job-first"):
        run_job("job-second", spec)


def test_a_resumed_job_redoes_only_missing_parts(ray_local, image_model, colour_images, tmp_path):
    manifest, colours = colour_images
    output = tmp_path / "out"
    spec = JobSpec(manifest, image_model, str(output), shard_size=4, top_k=2)
    run_job("job-r", spec)
    (output / "part-00001.parquet").unlink()
    (output / "_SUCCESS").unlink()
    kept = (output / "part-00000.parquet").stat().st_mtime_ns
    result = run_job("job-r", spec)
    assert result.summary["rows_this_run"] == 4 and result.summary["parts_written_this_run"] == 1
    assert (output / "part-00000.parquet").stat().st_mtime_ns == kept
    _assert_exact(_read(str(output)), colours, 2)


def test_labels_that_do_not_match_the_model_are_refused(ray_local, colour_images, tmp_path):
    from batchinf.errors import ModelError

    base = make_image_model(str(tmp_path / "m"))
    (tmp_path / "m" / "labels.txt").write_text("only\ntwo\n")
    with pytest.raises(ModelError, match="2 labels"):
        run_job("job-l", JobSpec(colour_images[0], base, str(tmp_path / "out")))


def test_a_header_only_manifest_succeeds_with_an_empty_readable_output(image_model, tmp_path):
    import duckdb
    import pandas as pd

    output = str(tmp_path / "out")
    manifest = write_manifest(tmp_path / "m.csv", ["uri", "id"], [])
    result = run_job("job-empty", JobSpec(manifest, image_model, output))
    assert result.summary["rows_total"] == 0 and storage.exists(f"{output}/_SUCCESS")
    table = pq.read_table(output)
    assert table.num_rows == 0 and table.column_names[:3] == ["uri", "id", "predictions"]
    assert len(pd.read_parquet(output)) == 0
    assert duckdb.sql(f"select count(*) from '{output}/*.parquet'").fetchall() == [(0,)]


@pytest.mark.parametrize("where", ["under_a_file", "missing_bucket"])
def test_an_output_that_cannot_be_written_fails_before_any_replica(
    image_model, colour_images, tmp_path, where, s3_endpoint
):
    (tmp_path / "a-file").write_text("not a folder")
    output = {"under_a_file": str(tmp_path / "a-file" / "out"),
              "missing_bucket": "s3://no-such-bucket-here/out"}[where]
    with pytest.raises(UsageError, match=f"cannot write to the output {output}") as caught:
        run_job("job-ro", JobSpec(colour_images[0], image_model, output))
    assert "part-00000" not in str(caught.value)


def test_an_exif_turned_photo_scores_as_the_same_photo_turned_in_pixels(ray_local, tmp_path):
    from PIL import Image

    from tests.models import make_top_half_model

    model = make_top_half_model(str(tmp_path / "top-half"))
    photo = Image.new("RGB", (40, 30), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 0, 20, 30))  # red on the left, blue on the right
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show": red ends up on top
    photo.save(tmp_path / "tagged.jpg", quality=95, exif=exif.tobytes())
    photo.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "turned.jpg", quality=95)
    photo.save(tmp_path / "as-stored.jpg", quality=95)
    rows = [[str(tmp_path / n)] for n in ("tagged.jpg", "turned.jpg", "as-stored.jpg")]
    output = str(tmp_path / "out")
    run_job("job-exif", JobSpec(write_manifest(tmp_path / "m.csv", ["uri"], rows), model, output))
    tagged, turned, stored = (_topk(r) for r in _read(output))
    assert [label for label, _ in tagged] == [label for label, _ in turned]
    assert [s for _, s in tagged] == pytest.approx([s for _, s in turned], abs=0.02)
    assert tagged[0][0] == "red" and stored[0][0] != "red"  # the model sees which way is up


def test_model_streams_split_each_batch_and_keep_every_row_its_own(
    ray_local, image_model, colour_images, tmp_path
):
    manifest, colours = colour_images
    output = str(tmp_path / "out")
    result = run_job("job-streams", JobSpec(manifest, image_model, output, top_k=3, batch_size=7))
    _assert_exact(_read(output), colours, 3)  # batches of 7 and 5 in parts of 4+3 and 3+2
    assert result.summary["resources"]["model_streams"] == 2


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_a_batch_split_into_streams_scores_each_row_as_a_whole_batch_does(image_model, streams):
    import numpy as np

    from batchinf.decode import DecodedBatch
    from batchinf.model import resolve_model
    from batchinf.predictor import Predictor
    from tests.conftest import COLOURS

    source = resolve_model(image_model)
    predictor = Predictor(source, 3, streams=streams)  # TensorFlow runs here already: threads stay
    spec = predictor.info.input
    rows = COLOURS + COLOURS[:1]  # 7 rows: parts of unequal size
    pixels = np.stack([np.full((spec.height, spec.width, 3), c, np.uint8) for c in rows])
    done = predictor.predict(DecodedBatch(len(rows), list(range(len(rows))), pixels=pixels))
    assert source.labels is not None and done.positions == list(range(len(rows)))
    for colour, ids, scores in zip(rows, done.class_ids, done.scores, strict=True):
        expected = expected_topk(colour, 3)
        assert [source.labels[c] for c in ids] == [label for label, _ in expected]
        assert list(scores) == pytest.approx([s for _, s in expected], abs=1e-5)
