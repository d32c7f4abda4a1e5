"""The manifest: header checks, pass-through text, and streaming shards."""

from __future__ import annotations

import tracemalloc

import pytest

from batchinf import manifest
from batchinf.errors import ManifestError


def _csv(tmp_path, text: str) -> str:
    path = tmp_path / "m.csv"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_shards_cut_rows_in_order_and_keep_text_unchanged(tmp_path):
    uri = _csv(tmp_path, 'uri,id,note\na.png,007,"x, y"\nb.png,8,é\nc.png,9,\n')
    shards = list(manifest.iter_shards(uri, 2))
    assert [(s.index, s.first_row, len(s)) for s in shards] == [(0, 0, 2), (1, 2, 1)]
    assert shards[0].rows[0] == ("a.png", "007", "x, y")
    assert shards[0].uris == ["a.png", "b.png"] and shards[1].rows[0] == ("c.png", "9", "")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("path,id\na,1\n", "no 'uri' column"),
        ("uri,id,id\na,1,2\n", "repeats"),
        ("uri,error\na,1\n", "writes itself"),
    ],
)
def test_bad_headers_are_refused_with_a_clear_message(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message):
        manifest.read_columns(_csv(tmp_path, text))


def test_a_missing_manifest_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="cannot read manifest"):
        manifest.count_rows(str(tmp_path / "absent.csv"))


def test_a_long_manifest_is_streamed_not_loaded(tmp_path):
    path = tmp_path / "big.csv"
    with path.open("w") as f:
        f.write("uri,id\n")
        for i in range(200_000):
            f.write(f"s3://bucket/images/{i:08d}.jpg,{i}\n")
    tracemalloc.start()
    count = sum(len(s) for s in manifest.iter_shards(str(path), 1000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 200_000
    assert peak < 5_000_000  # the whole file as rows would take well over 30 MB


def test_manifest_streams_from_s3(bucket):
    from batchinf import storage

    storage.write_bytes(f"s3://{bucket}/m.csv", b"uri,id\r\nx.png,1\r\ny.png,2\r\n")
    assert manifest.count_rows(f"s3://{bucket}/m.csv") == 2
    assert manifest.read_columns(f"s3://{bucket}/m.csv") == ("uri", "id")
