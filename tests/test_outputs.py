"""``--outputs``: named tensors of the serving signature written as columns ``output_<name>``
(fixed-size lists of float32), beside the top-k or, with ``--top-k 0``, instead of it.

Checked at submit from ``saved_model.pb`` (no TensorFlow there), written by the sink with one
schema for every part, and read back by pandas, pyarrow and DuckDB, as a similarity search
would use an embedding.
"""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchinf.client import parse_outputs
from batchinf.errors import ModelError, UsageError
from batchinf.job import JobSpec
from batchinf.manifest import Shard
from batchinf.model import resolve_model
from batchinf.predictor import PredictedBatch
from batchinf.signature import Signature, Tensor, inspect, model_info
from tests.conftest import COLOURS, submit_one_row, write_manifest
from tests.models import LABELS, expected_embedding, expected_topk, make_embedding_model

IMAGE = {"image": Tensor("float32", (None, 8, 8, 3))}


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Keras, two outputs: ``embedding`` [N, 4] and ``scores`` [N, 5] (tests/models.py)."""
    return make_embedding_model(str(tmp_path_factory.mktemp("models") / "embed"))


@pytest.fixture(scope="module")
def embedding_only_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same, with ``embedding`` alone: no [N, classes] output to rank."""
    return make_embedding_model(str(tmp_path_factory.mktemp("models") / "embed-only"), scores=False)


def _source(tmp_path):
    """A ModelSource for signature checks that read no file."""
    os.makedirs(tmp_path / "m" / "1", exist_ok=True)
    (tmp_path / "m" / "1" / "saved_model.pb").write_bytes(b"")
    return resolve_model(str(tmp_path / "m"))


# -- the signature, checked without TensorFlow -------------------------------------------------


def test_named_outputs_are_checked_and_sized_from_the_signature(tmp_path):
    source = _source(tmp_path)
    signature = Signature(IMAGE, {"scores": Tensor("float32", (None, 5)),
                                  "embedding": Tensor("float16", (None, 128))})
    info = model_info(signature, source, ["embedding"])
    assert (info.output_name, info.num_classes, info.outputs) == ("scores", 5, {"embedding": 128})
    assert info.ranks
    unranked = model_info(signature, source, ["embedding"], ranks=False)
    assert (unranked.output_name, unranked.num_classes, unranked.ranks) == ("", 0, False)
    # A written output is ranked only under a class output's name, never an embedding.
    assert model_info(signature, source, ["embedding", "scores"]).output_name == "scores"
    alone = Signature(IMAGE, {"scores": Tensor("float32", (None, 5))})
    assert model_info(alone, source, ["scores"]).output_name == "scores"


@pytest.mark.parametrize(("output", "says"), [
    ("embeding", "has no output 'embeding' (it has: embedding, ids, pooled, scores)"),
    ("ids", "is int64 of shape [None]; --outputs writes float outputs [N, D] with a fixed D"),
    ("pooled", "is float32 of shape [None, None]; --outputs writes float outputs [N, D]"),
])
def test_an_output_that_is_missing_or_not_a_fixed_float_matrix_is_a_usage_error(
        output, says, tmp_path):
    signature = Signature(IMAGE, {"scores": Tensor("float32", (None, 5)),
                                  "embedding": Tensor("float32", (None, 4)),
                                  "ids": Tensor("int64", (None,)),
                                  "pooled": Tensor("float32", (None, None))})
    with pytest.raises(UsageError) as caught:
        model_info(signature, _source(tmp_path), [output])
    assert says in str(caught.value) and str(caught.value).startswith(f"--outputs {output}:")
    assert "\n" not in str(caught.value)


def test_a_signature_with_no_class_output_needs_top_k_0(tmp_path):
    signature = Signature(IMAGE, {"embedding": Tensor("float32", (None, 4))})
    says = r"no \[N, classes\] float output .* besides --outputs embedding; with --top-k 0"
    with pytest.raises(ModelError, match=says):
        model_info(signature, _source(tmp_path), ["embedding"])
    info = model_info(signature, _source(tmp_path), ["embedding"], ranks=False)
    assert info.outputs == {"embedding": 4} and not info.ranks


def test_the_exported_keras_model_reads_as_two_outputs_without_tensorflow(
        embedding_model, embedding_only_model):
    both = inspect(resolve_model(embedding_model), ["embedding"])
    assert (both.output_name, both.num_classes, both.outputs) == ("scores", 5, {"embedding": 4})
    alone = inspect(resolve_model(embedding_only_model), ["embedding"], ranks=False)
    assert alone.outputs == {"embedding": 4} and not alone.ranks
    with pytest.raises(ModelError):
        inspect(resolve_model(embedding_only_model), ["embedding"])


# -- the options --------------------------------------------------------------------------------


def test_the_options_top_k_0_and_outputs_are_checked_in_the_spec():
    with pytest.raises(UsageError, match="--top-k 0 writes no predictions"):
        JobSpec("m.csv", "model", "out", top_k=0).validate()
    with pytest.raises(UsageError, match="0 .no predictions. or more"):
        JobSpec("m.csv", "model", "out", top_k=-1, outputs=["e"]).validate()
    with pytest.raises(UsageError, match="names an output twice"):
        JobSpec("m.csv", "model", "out", outputs=["e", "e"]).validate()
    spec = JobSpec("m.csv", "model", "out", top_k=0, outputs=["embedding"])
    spec.validate()
    assert spec.output_columns == {"embedding": "output_embedding"}
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert JobSpec.from_dict({"manifest": "m", "model": "x", "output": "o"}).outputs == []
    with pytest.raises(UsageError, match="output_embedding, which the manifest has already"):
        spec.check_columns(("uri", "output_embedding"))
    assert parse_outputs("embedding, probs") == ["embedding", "probs"]
    assert parse_outputs(["embedding"]) == ["embedding"]
    with pytest.raises(UsageError):
        parse_outputs(3)  # type: ignore[arg-type]


def test_a_job_spec_file_and_the_client_take_outputs(tmp_path, embedding_model):
    from batchinf.client import Client

    manifest = write_manifest(tmp_path / "m.csv", ["uri"], [["a.png"]])
    (tmp_path / "nightly.yaml").write_text(
        f"name: emb\nmanifest: {manifest}\nmodel: {embedding_model}\noutput: {tmp_path}/o\n"
        "top_k: 0\noutputs: embedding\n")
    client = Client(str(tmp_path / "store"))
    spec = client.build_spec(str(tmp_path / "nightly.yaml"), date="2026-12-01")
    assert (spec.top_k, spec.outputs) == (0, ["embedding"])
    client.check(spec)
    both = client.build_spec(manifest, model=embedding_model, output=str(tmp_path / "o2"),
                             top_k=2, outputs=["embedding", "scores"])
    assert both.output_columns == {"embedding": "output_embedding", "scores": "output_scores"}
    client.check(both)


@pytest.mark.parametrize(("options", "says"), [
    (["--outputs", "embeding"], "--outputs embeding: the serving signature of"),
    (["--top-k", "0"], "--top-k 0 writes no predictions"),
])
def test_a_bad_output_is_refused_at_submit_with_exit_2_and_one_line(
        options, says, embedding_model, tmp_path):
    done = submit_one_row(tmp_path, "--model", embedding_model, *options)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("batchinf: ") and says in done.stderr
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "store" / "jobs").exists() or not os.listdir(tmp_path / "store" / "jobs")


# -- the Parquet schema, without Ray ------------------------------------------------------------


def similarity(output: str, first: str, second: str) -> float:
    """DuckDB's cosine similarity of the embeddings of two rows of an output, by their uri.
    Parquet keeps a fixed-size list as a list, FLOAT[] in DuckDB; cast to the array FLOAT[4]
    it takes the array functions (DuckDB 2.0's list_cosine_similarity refuses a column that
    has a null row, as error rows are)."""
    found = duckdb.sql(f"""
        select array_cosine_similarity(a.output_embedding::FLOAT[4], b.output_embedding::FLOAT[4])
        from read_parquet('{output}/*.parquet') a, read_parquet('{output}/*.parquet') b
        where a.uri = '{first}' and b.uri = '{second}'""").fetchall()
    assert len(found) == 1
    return float(found[0][0])



def _shard(index: int, rows: int) -> Shard:
    return Shard(index, index * rows, ("uri",), tuple((f"{index}-{i}.png",) for i in range(rows)))


def _batch(rows: int, failed: set[int], *, ranked: bool) -> PredictedBatch:
    """A batch whose row i has the embedding [i, 0, 0, 1] (and ranked scores when ``ranked``)."""
    ok = [i for i in range(rows) if i not in failed]
    embedding = np.array([[i, 0.0, 0.0, 1.0] for i in ok], np.float32).reshape(len(ok), 4)
    k = 2 if ranked else 0
    ids = np.tile(np.arange(k, dtype=np.int32), (len(ok), 1))
    scores = np.tile(np.linspace(0.9, 0.1, k, dtype=np.float32), (len(ok), 1))
    return PredictedBatch(rows, ok, ids, scores, {i: ("not_found", "gone") for i in failed},
                          {"embedding": embedding})


@pytest.mark.parametrize("ranked", [False, True])
def test_every_part_has_the_same_schema_with_a_fixed_size_list_and_nulls_on_error_rows(
        ranked, tmp_path):
    from batchinf import sink

    run = sink.RunInfo("job-e", "embed", "1", tuple(LABELS), ranked, {"embedding": 4})
    first = sink.build_table(_shard(0, 5), [_batch(3, {1}, ranked=ranked),
                                            _batch(2, set(), ranked=ranked)], run)
    second = sink.build_table(_shard(1, 5), [_batch(5, {0, 4}, ranked=ranked)], run)
    output = str(tmp_path / "out")
    sink.write_part(output, 0, first)
    sink.write_part(output, 1, second)
    sink.write_empty_part(str(tmp_path / "empty"), ("uri",), "job-e", None, {"embedding": 4})
    schemas = [pq.read_schema(os.path.join(output, sink.part_name(i))) for i in (0, 1)]
    schemas.append(pq.read_schema(str(tmp_path / "empty" / sink.part_name(0))))
    assert schemas[0] == schemas[1] == schemas[2]
    assert schemas[0].field("output_embedding").type == pa.list_(pa.float32(), 4)
    assert schemas[0].names.index("output_embedding") == schemas[0].names.index("top1_score") + 1

    rows = pq.read_table(output).to_pylist()
    embeddings = [r["output_embedding"] for r in rows]
    assert embeddings == [[0, 0, 0, 1], None, [2, 0, 0, 1], [0, 0, 0, 1], [1, 0, 0, 1],
                          None, [1, 0, 0, 1], [2, 0, 0, 1], [3, 0, 0, 1], None]
    assert [r["error_kind"] for r in rows] == [
        None if e is not None else "not_found" for e in embeddings]
    frame = pd.read_parquet(output)
    assert frame["output_embedding"].isna().tolist() == [e is None for e in embeddings]
    assert list(frame["output_embedding"][2]) == [2, 0, 0, 1]
    assert duckdb.sql(f"select typeof(output_embedding) from '{output}/*.parquet' limit 1"
                      ).fetchall() == [("FLOAT[]",)]
    assert similarity(output, "0-0.png", "0-2.png") == pytest.approx(1 / np.sqrt(5), abs=1e-6)
    if ranked:
        assert rows[0]["top1_label"] == LABELS[0] and len(rows[0]["predictions"]) == 2
    else:  # --top-k 0: the prediction columns are there, null on every row
        assert {(r["predictions"], r["top1_label"], r["top1_score"]) for r in rows} == {
            (None, None, None)}


def test_a_top_k_0_part_counts_its_rows_and_describes_itself(tmp_path):
    from batchinf import report, sink

    run = sink.RunInfo("job-e", "embed", "1", None, False, {"embedding": 4})
    table = sink.build_table(_shard(0, 4), [_batch(4, {2}, ranked=False)], run)
    stats = report.count_table(0, table, None)
    assert (stats.rows, stats.failed, stats.classes, stats.errors) == (4, 1, {}, {"not_found": 1})
    summary = {"job_id": "job-e", "rows_total": 4, "rows_failed": 1, "top_k": 0,
               "errors_by_kind": {"not_found": 1},
               "outputs": [{"name": "embedding", "column": "output_embedding", "size": 4}]}
    text = report.describe(summary | report.figures([stats]))
    assert "no top-k (--top-k 0): the job wrote output_embedding only" in text
    assert "top-1 classes" not in text and "errors not_found: 1" in text


def test_a_top_k_0_output_goes_into_the_ledger_as_a_top_k_output_does(tmp_path):
    from batchinf import sink
    from batchinf.ledger import Ledger

    run = sink.RunInfo("job-e", "embed", "1", None, False, {"embedding": 4})
    output = str(tmp_path / "out")
    sink.write_part(output, 0, sink.build_table(_shard(0, 3), [_batch(3, {1}, ranked=False)], run))
    ledger = Ledger(str(tmp_path / "store"), "emb")
    assert ledger.record_output("job-e", output)
    latest = ledger.latest().sort_by("uri").to_pylist()
    assert [(r["uri"], r["ok"], r["top1_label"]) for r in latest] == [
        ("0-0.png", True, None), ("0-1.png", False, None), ("0-2.png", True, None)]
    assert len(ledger.scored("embed", "1")) == 2  # an incremental night skips the two ok rows


# -- the model, in this process -----------------------------------------------------------------


@pytest.mark.parametrize("top_k", [0, 3])
def test_the_predictor_returns_exact_embeddings_beside_or_instead_of_the_top_k(
        top_k, embedding_model, embedding_only_model):
    from batchinf.decode import DecodedBatch
    from batchinf.predictor import Predictor

    source = resolve_model(embedding_model if top_k else embedding_only_model)
    predictor = Predictor(source, top_k, outputs=["embedding"])
    spec = predictor.info.input
    rows = COLOURS + COLOURS[:1]
    pixels = np.stack([np.full((spec.height, spec.width, 3), c, np.uint8) for c in rows])
    done = predictor.predict(DecodedBatch(len(rows) + 1, list(range(len(rows))), pixels=pixels,
                                          errors={len(rows): ("not_found", "gone")}))
    assert done.outputs["embedding"].dtype == np.float32
    assert done.outputs["embedding"] == pytest.approx(
        np.stack([expected_embedding(c) for c in rows]), abs=1e-5)
    assert done.class_ids.shape == (len(rows), top_k)
    if top_k:
        assert [LABELS[i] for i in done.class_ids[0]] == [
            label for label, _ in expected_topk(rows[0], top_k)]


# -- whole jobs on Ray ----------------------------------------------------------------------------


def _manifest(tmp_path, colours) -> str:
    """The colours as PNGs, then a row whose file is missing (an error row)."""
    from tests.models import write_solid_image

    rows = []
    for i, colour in enumerate(colours):
        write_solid_image(str(tmp_path / "img" / f"{i}.png"), colour)
        rows.append([f"img/{i}.png", str(i)])
    rows.append(["img/missing.png", str(len(colours))])
    return write_manifest(tmp_path / "m.csv", ["uri", "n"], rows)


def test_a_top_k_0_job_writes_embeddings_that_pandas_pyarrow_and_duckdb_read(
        ray_local, embedding_only_model, tmp_path):
    from batchinf.pipeline import run_job

    colours = COLOURS  # 6 rows and a missing one, in parts of 3
    output = str(tmp_path / "out")
    spec = JobSpec(_manifest(tmp_path, colours), embedding_only_model, output, top_k=0,
                   outputs=["embedding"], batch_size=2, shard_size=3)
    result = run_job("job-emb", spec)
    assert result.summary["outputs"] == [{"name": "embedding", "column": "output_embedding",
                                          "size": 4}]
    assert (result.summary["rows_ok"], result.summary["rows_failed"]) == (6, 1)
    assert result.summary["top1_classes"] == {} and result.summary["top1_score_mean"] is None

    table = pq.read_table(output)
    assert table.schema.field("output_embedding").type == pa.list_(pa.float32(), 4)
    rows = table.to_pylist()
    for row, colour in zip(rows, colours, strict=False):
        assert row["output_embedding"] == pytest.approx(expected_embedding(colour), abs=1e-5)
        assert (row["predictions"], row["top1_label"], row["error"]) == (None, None, None)
    assert rows[-1]["output_embedding"] is None and rows[-1]["error_kind"] == "not_found"

    frame = pd.read_parquet(output)
    vectors = np.stack(frame.loc[frame.error.isna(), "output_embedding"])
    assert vectors.shape == (6, 4) and vectors.dtype == np.float32
    red, green = expected_embedding(colours[0]), expected_embedding(colours[1])
    cosine = float(red @ green / np.linalg.norm(red) / np.linalg.norm(green))
    assert similarity(output, "img/0.png", "img/1.png") == pytest.approx(cosine, abs=1e-5)
    nearest = duckdb.sql(f"""
        select b.n from read_parquet('{output}/*.parquet') a, read_parquet('{output}/*.parquet') b
        where a.uri = 'img/0.png' and b.error is null and b.uri != a.uri
        order by array_cosine_similarity(a.output_embedding::FLOAT[4],
                                         b.output_embedding::FLOAT[4]) desc limit 1""").fetchall()
    best = max(range(1, 6), key=lambda i: float(
        red @ expected_embedding(colours[i]) / np.linalg.norm(expected_embedding(colours[i]))))
    assert nearest == [(str(best),)]


def test_a_job_writes_the_top_k_and_the_embedding_side_by_side(
        ray_local, embedding_model, tmp_path):
    from batchinf.pipeline import run_job

    output = str(tmp_path / "out")
    spec = JobSpec(_manifest(tmp_path, COLOURS), embedding_model, output, top_k=3,
                   outputs=["embedding"], batch_size=4, shard_size=4)
    result = run_job("job-both", spec)
    assert result.summary["rows_ok"] == 6 and sum(result.summary["top1_classes"].values()) == 6
    rows = pq.read_table(output).to_pylist()
    for row, colour in zip(rows, COLOURS, strict=False):
        assert [(p["label"], p["score"]) for p in row["predictions"]] == [
            (label, pytest.approx(score, abs=1e-5)) for label, score in expected_topk(colour, 3)]
        assert row["output_embedding"] == pytest.approx(expected_embedding(colour), abs=1e-5)
    assert rows[-1]["predictions"] is None and rows[-1]["output_embedding"] is None
