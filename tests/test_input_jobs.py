"""Whole jobs on listings, Parquet and JSONL manifests (real Ray, moto over HTTP, real models)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinf import storage
from batchinf.errors import ManifestError
from batchinf.job import JobSpec
from batchinf.pipeline import run_job
from tests.conftest import COLOURS
from tests.models import expected_topk, write_solid_image


def _png(rgb: tuple[int, int, int], folder) -> bytes:
    path = write_solid_image(str(folder / f"{rgb}.png"), rgb)
    with open(path, "rb") as f:
        return f.read()


def _read(output: str) -> list[dict]:
    if not storage.is_s3(output):
        return pq.read_table(output).to_pylist()
    names = sorted(n for n in storage.list_names(output) if n.endswith(".parquet"))
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/{n}"))) for n in names]
    return pa.concat_tables(tables).to_pylist()


def _top1(rgb: tuple[int, int, int]) -> str:
    return expected_topk(rgb, 1)[0][0]


def _photos(bucket: str, tmp_path, count: int = 6) -> tuple[str, dict[str, tuple]]:
    """An S3 prefix of solid-colour images in mixed-case names, and a text file; key -> colour."""
    prefix = f"s3://{bucket}/photos/2026-11-21/"
    colours = {}
    for i in range(count):
        key = f"{i:02d}.{'PNG' if i % 2 else 'png'}"
        colours[key] = COLOURS[i % len(COLOURS)]
        storage.write_bytes(prefix + key, _png(colours[key], tmp_path))
    storage.write_bytes(prefix + "readme.txt", b"not a row")
    return prefix, colours


def test_a_listing_job_scores_every_image_under_a_prefix(ray_local, image_model, bucket, tmp_path):
    prefix, colours = _photos(bucket, tmp_path)
    output = f"s3://{bucket}/out/"
    result = run_job("job-list", JobSpec(prefix, image_model, output, shard_size=4, batch_size=2))
    rows = _read(output.rstrip("/"))
    assert [r["uri"] for r in rows] == [prefix + k for k in sorted(colours)]
    assert [r["top1_label"] for r in rows] == [_top1(colours[k]) for k in sorted(colours)]
    schema = pq.read_schema(io.BytesIO(storage.read_bytes(f"{output}part-00000.parquet")))
    assert schema.field("size").type == pa.int64() and str(schema.field("etag").type) == "string"
    assert result.summary["rows_total"] == 6 and storage.exists(f"{output}_listing/_COMPLETE")


def test_a_local_folder_with_include_is_listed(ray_local, image_model, tmp_path):
    for i, name in enumerate(["keep/a.png", "keep/B.Png", "skip/c.png"]):
        write_solid_image(str(tmp_path / "in" / name), COLOURS[i])
    spec = JobSpec(str(tmp_path / "in"), image_model, str(tmp_path / "out"), include=["keep/*"])
    run_job("job-include", spec)
    rows = _read(str(tmp_path / "out"))
    assert [r["uri"].rsplit("/", 2)[1:] for r in rows] == [["keep", "B.Png"], ["keep", "a.png"]]
    assert [r["top1_label"] for r in rows] == [_top1(COLOURS[1]), _top1(COLOURS[0])]


def test_a_resumed_listing_job_does_exactly_the_first_attempts_rows(
        ray_local, image_model, bucket, tmp_path):
    prefix, colours = _photos(bucket, tmp_path)
    output = str(tmp_path / "out")
    spec = JobSpec(prefix, image_model, output, shard_size=2, batch_size=2)
    first = run_job("job-frozen", spec, should_stop=(tmp_path / "out" / "part-00000.parquet").exists)
    assert first.cancelled and (tmp_path / "out" / "_listing" / "_COMPLETE").exists()
    redone = min(i for i in range(3) if not (tmp_path / "out" / f"part-{i:05d}.parquet").exists())
    storage.delete(prefix + sorted(colours)[2 * redone])  # listed, not scored yet
    storage.write_bytes(prefix + "00a.png", _png(COLOURS[0], tmp_path))
    storage.write_bytes(prefix + "zz.png", _png(COLOURS[1], tmp_path))
    result = run_job("job-frozen", spec)
    rows = _read(output)
    assert [r["uri"][len(prefix):] for r in rows] == sorted(colours)
    assert [i for i, r in enumerate(rows) if r["error_kind"]] == [2 * redone]
    assert rows[2 * redone]["error_kind"] == "not_found" and result.summary["rows_total"] == 6
    assert result.summary["rows_this_run"] < 6  # the first attempt's part was kept


def test_a_parquet_manifest_keeps_an_int_column_an_int(ray_local, image_model, tmp_path):
    paths = [write_solid_image(str(tmp_path / f"{i}.png"), c) for i, c in enumerate(COLOURS[:3])]
    table = pa.table({"uri": paths, "n": pa.array([7, 8, 9], pa.int64()),
                      "when": pa.array([1, 2, None], pa.timestamp("ms"))})
    pq.write_table(table, tmp_path / "m.parquet")
    run_job("job-pq", JobSpec(str(tmp_path / "m.parquet"), image_model, str(tmp_path / "out")))
    out = pq.read_table(str(tmp_path / "out"))
    assert out.schema.field("n").type == pa.int64() and out.column("n").to_pylist() == [7, 8, 9]
    assert out.schema.field("when").type == pa.timestamp("ms")
    assert out.column("top1_label").to_pylist() == [_top1(c) for c in COLOURS[:3]]


def test_bad_rows_of_jsonl_and_parquet_get_error_rows(ray_local, image_model, tmp_path):
    good = write_solid_image(str(tmp_path / "good.png"), COLOURS[0])
    (tmp_path / "text.png").write_bytes(b"hello")
    uris = [good, str(tmp_path / "missing.png"), str(tmp_path / "text.png")]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"uri": u, "n": i})
                                                for i, u in enumerate(uris)))
    pq.write_table(pa.table({"uri": uris}), tmp_path / "m.parquet")
    for name in ("m.jsonl", "m.parquet"):
        run_job(f"job-{name[2:]}", JobSpec(str(tmp_path / name), image_model, str(tmp_path / name[2:])))
        rows = _read(str(tmp_path / name[2:]))
        assert [r["error_kind"] for r in rows] == [None, "not_found", "not_an_image"]
    assert [r["n"] for r in _read(str(tmp_path / "jsonl"))] == ["0", "1", "2"]


def test_a_prefix_without_images_fails_before_any_replica(image_model, bucket, tmp_path):
    storage.write_bytes(f"s3://{bucket}/docs/a.txt", b"x")
    with pytest.raises(ManifestError, match="no images"):
        run_job("job-none", JobSpec(f"s3://{bucket}/docs/", image_model, str(tmp_path / "out")))


def test_submit_takes_a_listing_with_include_and_refuses_a_folder_without_images(
        image_model, tmp_path):
    from batchinf.jobstore import JobStore
    from tests.test_cli import cli_env, only_line, run_cli

    write_solid_image(str(tmp_path / "in" / "a.png"), COLOURS[0])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    env = cli_env(tmp_path, RAY_ADDRESS="http://127.0.0.1:9")  # queued for a cluster's dispatcher
    common = ["--model", image_model, "--output", str(tmp_path / "out")]
    done = run_cli("submit", str(tmp_path / "in") + "/", *common, "--include", "*.png",
                   "--include", "*.PNG", env=env)
    assert done.returncode == 0, done.stderr
    spec = JobStore.from_uri(env["BATCHINF_STORE"]).list()[0].spec
    assert spec.manifest == str(tmp_path / "in") and spec.include == ["*.png", "*.PNG"]
    refused = run_cli("submit", str(tmp_path / "docs"), *common, env=env)
    assert refused.returncode == 1 and "no images (jpg" in only_line(refused.stderr)
