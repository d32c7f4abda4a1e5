"""The scored-rows ledger on a local folder and on moto's S3: what counts as scored, compaction,
and the newest prediction of every URI."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from batchinf.ledger import Ledger, content_versions


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('bucket')}/store"


def night(uris: list[str], etags: list[str], *, version: str = "2", errors: dict[int, str] | None = None,
          label: str = "cat") -> pa.Table:
    errors = errors or {}
    n = len(uris)
    return pa.table({
        "uri": uris, "etag": etags, "size": list(range(n)),
        "top1_label": [None if i in errors else label for i in range(n)],
        "top1_score": pa.array([None if i in errors else 0.9 for i in range(n)], pa.float32()),
        "error": [errors.get(i) for i in range(n)],
        "model_name": ["mnv2"] * n, "model_version": [version] * n,
    })


def test_a_row_counts_as_scored_only_if_ok_same_content_and_same_model(root):
    ledger = Ledger(root, "nightly")
    assert ledger.record("bi-1", night(["a", "b", "c"], ["e1", "e2", "e3"], errors={2: "corrupt"}),
                         scored_at=100)
    assert not ledger.record("bi-1", night(["a"], ["e1"]))  # a night is added once
    scored = ledger.scored("mnv2", "2")
    assert len(scored) == 2
    hits = scored.contains(["a", "b", "b", "c", "d"], ["e1", "e2", "e2-new", "e3", "e4"])
    assert hits.tolist() == [True, True, False, False, False]  # changed, failed, new: scored again
    assert len(ledger.scored("mnv2", "3")) == 0 and len(ledger.scored("resnet", "2")) == 0


def test_a_resumed_night_plans_with_its_first_attempts_files(root):
    ledger = Ledger(root, "nightly")
    ledger.record("bi-1", night(["a"], ["e1"]), scored_at=100)
    files = ledger.files()
    ledger.record("bi-2", night(["b"], ["e2"]), scored_at=200)
    assert ledger.scored("mnv2", "2", files).contains(["a", "b"], ["e1", "e2"]).tolist() == [True, False]


def test_compaction_keeps_what_counts_and_the_newest_prediction_of_every_uri(root):
    ledger = Ledger(root, "nightly")
    ledger.record("bi-1", night(["a", "b"], ["e1", "e2"], label="cat"), scored_at=100)
    ledger.record("bi-2", night(["a"], ["e1b"], label="dog"), scored_at=200)
    ledger.record("bi-3", night(["c"], ["e3"], version="3", label="owl"), scored_at=300)
    before = ledger.scored("mnv2", "2").contains(["a", "a", "b"], ["e1", "e1b", "e2"]).tolist()
    assert ledger.compact() == "base-bi-3.parquet" and ledger.files() == ["base-bi-3.parquet"]
    after = ledger.scored("mnv2", "2").contains(["a", "a", "b"], ["e1", "e1b", "e2"]).tolist()
    assert before == [True, True, True] and after == [False, True, True]  # a's old content is gone
    latest = {r["uri"]: (r["top1_label"], r["job_id"]) for r in ledger.latest().to_pylist()}
    assert latest == {"a": ("dog", "bi-2"), "b": ("cat", "bi-1"), "c": ("owl", "bi-3")}


def test_content_version_is_the_etag_else_size_and_time_else_empty():
    assert content_versions(pa.table({"uri": ["a"], "etag": ['"x"']})).to_pylist() == ['"x"']
    local = pa.table({"uri": ["a"], "size": [12], "last_modified": ["2026-12-01T00:00:00Z"]})
    assert content_versions(local).to_pylist() == ["12:2026-12-01T00:00:00Z"]
    assert content_versions(pa.table({"uri": ["a", "b"]})).to_pylist() == ["", ""]


def test_a_finished_outputs_rows_are_added_once_with_their_content_versions(tmp_path):
    import pyarrow.parquet as pq

    output = tmp_path / "out"
    output.mkdir()
    for shard, (uris, sizes) in enumerate([(["a", "b"], [10, 20]), (["c"], [30])]):
        table = night(uris, [""] * len(uris)).drop_columns(["etag", "size"])
        table = table.append_column("size", pa.array(sizes, pa.int64()))
        pq.write_table(table, output / f"part-{shard:05d}.parquet")
    ledger = Ledger(str(tmp_path / "store"), "nightly")
    assert ledger.record_output("bi-1", str(output)) and not ledger.record_output("bi-1", str(output))
    scored = ledger.scored("mnv2", "2")
    assert scored.contains(["a", "b", "c", "c"], ["10", "20", "30", "31"]).tolist() == [True, True, True, False]
