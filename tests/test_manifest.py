"""The manifest: header checks, pass-through text, and streaming shards."""

from __future__ import annotations

import csv
import os
import tempfile
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


CELL = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=10)
NAME = st.text("abcdefgh_ é", min_size=1, max_size=8).map(str.strip).filter(
    lambda n: bool(n) and n != manifest.URI_COLUMN and n not in manifest.RESERVED_COLUMNS)


@settings(max_examples=150, deadline=None)
@given(extra=st.lists(NAME, unique=True, max_size=3), data=st.data(),
       shard_size=st.integers(1, 4))
def test_rows_and_pass_through_columns_round_trip_exactly(extra, data, shard_size):
    columns = (manifest.URI_COLUMN, *extra)
    rows = data.draw(st.lists(st.tuples(*[CELL] * len(columns)), max_size=12))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.csv")
        with open(path, "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([columns, *rows])
        shards = list(manifest.iter_shards(path, shard_size))
    assert [row for shard in shards for row in shard.rows] == rows
    assert all(shard.columns == columns for shard in shards)
    assert [len(shard) for shard in shards[:-1]] == [shard_size] * (len(shards) - 1)


def test_blank_lines_and_quoted_commas_and_newlines(tmp_path):
    uri = _csv(tmp_path, 'uri,note\n\n"a,1.png","x, ""y""\nz"\n\n\nb.png,\n')
    assert [s.rows for s in manifest.iter_shards(uri, 10)] == [(("a,1.png", 'x, "y"\nz'), ("b.png", ""))]


def test_a_byte_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"uri,note\na.png,ok\nb.png,caf\xe9\nc.png,ok\n")
    with pytest.raises(ManifestError, match=r"line 3.*not valid UTF-8"):
        manifest.count_rows(str(path))


def test_a_header_only_manifest_has_its_columns_and_no_rows(tmp_path):
    uri = _csv(tmp_path, "uri,id\n")
    assert manifest.read_columns(uri) == ("uri", "id")
    assert manifest.count_rows(uri) == 0 and list(manifest.iter_shards(uri, 5)) == []
