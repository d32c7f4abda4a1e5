"""Manifests beyond CSV: listings of a folder or an S3 prefix, Parquet and JSONL."""

from __future__ import annotations

import concurrent.futures
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinf import manifest, storage
from batchinf.errors import ManifestError, UsageError

NAMES = ["b.png", "A.JPG", "sub/c.Jpeg", "sub/notes.txt", "a.b/x.WebP", "a.png", "d.tiff", "e.gif"]
IN_KEY_ORDER = ["A.JPG", "a.b/x.WebP", "a.png", "b.png", "d.tiff", "e.gif", "sub/c.Jpeg"]


def _folder(tmp_path, names=NAMES) -> str:
    for name in names:
        (tmp_path / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / name).write_bytes(b"x" * len(name))
    return str(tmp_path / "photos")


def _prefix(bucket: str, names=NAMES) -> str:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: storage.write_bytes(f"s3://{bucket}/photos/{n}", b"x"), names))
    return f"s3://{bucket}/photos/"


def _rows(uri: str, include=None, shard_size: int = 3, **frozen) -> list[tuple]:
    rows = manifest.open_manifest(uri, include, **frozen)
    return [row for shard in rows.shards(shard_size) for row in shard.rows]


def test_a_folder_lists_its_images_in_any_case_in_key_order(tmp_path):
    folder = _folder(tmp_path)
    rows = _rows(folder)
    assert [r[0] for r in rows] == [f"{folder}/{n}" for n in IN_KEY_ORDER]
    assert rows[0][1] == len("A.JPG") and rows[0][2].tzinfo is not None
    assert manifest.check(folder) == ("uri", "size", "last_modified")


def test_an_s3_prefix_lists_its_images_with_etags(bucket):
    prefix = _prefix(bucket)
    rows = _rows(prefix)
    assert [r[0] for r in rows] == [f"{prefix}{n}" for n in IN_KEY_ORDER]
    assert manifest.check(prefix) == ("uri", "size", "last_modified", "etag")
    assert {r[1] for r in rows} == {1} and all(len(r[3]) == 32 for r in rows)


def test_include_globs_replace_the_extension_filter(tmp_path, bucket):
    folder, prefix = _folder(tmp_path), _prefix(bucket)
    assert [r[0] for r in _rows(folder, ["sub/*"])] == [f"{folder}/sub/c.Jpeg", f"{folder}/sub/notes.txt"]
    assert [r[0] for r in _rows(prefix, ["*.png", "*.txt"])] == [
        f"{prefix}{n}" for n in ("a.png", "b.png", "sub/notes.txt")]


def test_a_listing_reads_page_after_page_and_yields_a_shard_before_it_ends(bucket, tmp_path):
    names = [f"k/{i:05d}.jpg" for i in range(2100)]
    prefix, output = _prefix(bucket, names), tmp_path / "out"
    shards = manifest.open_manifest(prefix, output=str(output), job_id="job-1").shards(1000)
    first = next(shards)
    assert len(first) == 1000 and os.listdir(output / "_listing") == ["part-00000.parquet"]
    rows = [*first.rows, *(row for shard in shards for row in shard.rows)]
    assert [r[0].rsplit("/photos/", 1)[1] for r in rows] == names
    assert (output / "_listing" / "_COMPLETE").exists()


def test_a_prefix_without_images_is_one_clear_error(tmp_path, bucket):
    with pytest.raises(ManifestError, match=r"no images \(jpg, .*\) under s3://.*/photos/"):
        manifest.check(_prefix(bucket, ["a.txt", "b.csv"]))
    with pytest.raises(ManifestError, match=r"no objects matching --include \*\.bmp under"):
        manifest.check(_folder(tmp_path), ["*.bmp"])


def test_a_listing_is_frozen_so_a_later_attempt_sees_the_same_rows(bucket, tmp_path):
    prefix, output = _prefix(bucket), str(tmp_path / "out")
    first = _rows(prefix, output=output, job_id="job-1")
    storage.write_bytes(f"{prefix}added.png", b"x")
    storage.delete(f"{prefix}a.png")
    again = manifest.open_manifest(prefix, output=output, job_id="job-1")
    assert again.count() == len(IN_KEY_ORDER)
    assert [r for shard in again.shards(3) for r in shard.rows] == first
    with pytest.raises(UsageError, match="holds the listing of job job-1"):
        _rows(prefix, output=output, job_id="job-2")


def test_a_listing_cut_short_lists_on_after_its_last_frozen_key(tmp_path):
    folder, output = _folder(tmp_path), str(tmp_path / "out")
    rows = manifest.open_manifest(folder, output=output, job_id="job-1")
    first = next(rows.shards(3))  # the attempt ends after its first shard
    _folder(tmp_path, ["0.png", "zz.png"])  # one before the frozen keys, one after
    again = manifest.open_manifest(folder, output=output, job_id="job-1")
    assert again.count() is None
    shards = list(again.shards(3))
    assert shards[0].rows == first.rows and again.total == len(IN_KEY_ORDER) + 1
    assert [r[0].rsplit("/", 1)[1] for s in shards[1:] for r in s.rows] == [
        "b.png", "d.tiff", "e.gif", "c.Jpeg", "zz.png"]


def test_parquet_columns_keep_their_types(tmp_path):
    table = pa.table({"uri": ["a.png", "b.png", "c.png"], "n": pa.array([1, 2, 3], pa.int32()),
                      "tags": [["x"], [], None]})
    pq.write_table(table, tmp_path / "m.parquet")
    rows = manifest.open_manifest(str(tmp_path / "m.parquet"))
    assert rows.check() == ("uri", "n", "tags") and rows.count() == 3
    assert rows.types == (pa.string(), pa.int32(), pa.list_(pa.string()))
    assert [s.rows for s in rows.shards(2)] == [(("a.png", 1, ["x"]), ("b.png", 2, [])),
                                                (("c.png", 3, None),)]


def test_a_prefix_of_parquet_parts_on_s3_is_one_manifest(bucket):
    for i in range(2):
        data = pa.table({"uri": [f"{i}a.png", f"{i}b.png"], "n": [i, i]})
        storage.write_bytes(f"s3://{bucket}/m/part-{i}.parquet", _parquet_bytes(data))
    storage.write_bytes(f"s3://{bucket}/m/_SUCCESS", b"")
    rows = manifest.open_manifest(f"s3://{bucket}/m/")
    assert rows.count() == 4 and _rows(f"s3://{bucket}/m/") == [
        ("0a.png", 0), ("0b.png", 0), ("1a.png", 1), ("1b.png", 1)]


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_a_parquet_without_uri_is_one_clear_error(tmp_path):
    pq.write_table(pa.table({"path": ["a.png"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="has no 'uri' column"):
        manifest.check(str(tmp_path / "m.parquet"))


def test_jsonl_objects_are_rows_and_other_values_are_json_text(tmp_path):
    lines = [{"uri": "a.png", "n": 1, "tags": ["x"]}, {"uri": "b.png", "n": None}, {"uri": "c.png"}]
    (tmp_path / "m.ndjson").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert manifest.check(str(tmp_path / "m.ndjson")) == ("uri", "n", "tags")
    assert _rows(str(tmp_path / "m.ndjson")) == [
        ("a.png", "1", '["x"]'), ("b.png", None, None), ("c.png", None, None)]


@pytest.mark.parametrize("text, message", [
    ('{"path": "a.png"}\n', "no 'uri' column"),
    ('{"uri": "a.png"}\n[1, 2]\n', "line 2 is not a JSON object"),
    ('{"uri": "a.png"}\n{"uri": "b.png", "x": 1}\n', "line 2 has key"),
    ('{"uri": "a.png"\n', "line 1 is not valid JSON"),
])
def test_bad_jsonl_is_named_with_its_line(tmp_path, text, message):
    (tmp_path / "m.jsonl").write_text(text)
    with pytest.raises(ManifestError, match=message):
        manifest.count_rows(str(tmp_path / "m.jsonl"))


def test_a_job_spec_names_a_dated_prefix_and_one_glob(tmp_path):
    from batchinf import jobfile

    (tmp_path / "nightly.yaml").write_text(
        "name: photos\nmanifest: s3://cams/photos/{date}/\nmodel: m\noutput: o/{date}\n"
        "include: '*.jpg'\n")
    rendered = jobfile.load(str(tmp_path / "nightly.yaml"), "2026-11-21")
    assert rendered["manifest"] == "s3://cams/photos/2026-11-21/"
    assert rendered["include"] == ["*.jpg"]


def test_progress_while_a_listing_goes_on_shows_no_total_and_no_eta():
    from batchinf.display import log_line
    from batchinf.progress import Progress

    progress = Progress(rows_total=None, rows_done=512, rows_this_run=512, rows_listed=2048)
    assert progress.eta_s is None
    assert "512/? rows (2048 listed so far)" in log_line("job-1", progress)
    assert "ETA ?" in log_line("job-1", progress)
