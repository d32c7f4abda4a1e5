"""Champion and challenger in one job (``--challenger``): each image fetched and decoded once,
both models' top-k side by side in the Parquet, the two compared in the summary, and the replica
holding both reserved with their memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchinf.decode import InputSpec, decode_batch
from batchinf.errors import UsageError
from batchinf.job import CHALLENGER_COLUMNS, JobSpec
from batchinf.model import (
    ACTIVATION_COPIES,
    MODEL_BYTES_FACTOR,
    MODEL_OVERHEAD_BYTES,
    REPLICA_RUNTIME_BYTES,
    replica_memory,
    resolve_model,
    saved_model_bytes,
)
from batchinf.planner import Infeasible, NodeView, plan
from batchinf.sink import output_schema
from tests.conftest import COLOURS, submit_one_row, write_manifest
from tests.models import (
    CHALLENGER_SIZE,
    SIZE,
    expected_challenger_topk,
    expected_topk,
    make_challenger_model,
    write_solid_image,
)

GiB = 2.0**30


@pytest.fixture(scope="module")
def challenger_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Red and green swapped, uint8 pixels at 16x16 (tests/models.py)."""
    return make_challenger_model(str(tmp_path_factory.mktemp("models") / "swapped"))


def _manifest(tmp_path, colours, bad: bool = True) -> str:
    rows = [[write_solid_image(str(tmp_path / "img" / f"{i}.png"), c), f"{i}"]
            for i, c in enumerate(colours)]
    if bad:
        (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
        rows.append([str(tmp_path / "img" / "broken.png"), "broken"])
    return write_manifest(tmp_path / "m.csv", ["uri", "id"], rows)


# -- decode once, inputs for both ------------------------------------------------------------


def test_one_decode_gives_each_model_its_own_size_and_type(tmp_path, monkeypatch):
    import PIL.Image

    uris = [write_solid_image(str(tmp_path / f"{i}.png"), c) for i, c in enumerate(COLOURS[:3])]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    uris.insert(1, str(tmp_path / "bad.png"))
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))

    batch = decode_batch(uris, InputSpec("image", SIZE, SIZE), threads=2,
                         challenger=InputSpec("image", CHALLENGER_SIZE, CHALLENGER_SIZE))
    assert len(opened) == 4  # one decode an image, the bad one included
    assert batch.positions == [0, 2, 3] and batch.errors[1][0] == "corrupt_image"
    assert batch.pixels.shape == (3, SIZE, SIZE, 3)
    second = batch.challenger
    assert second is not None and second.positions == [0, 2, 3]
    assert second.pixels.shape == (3, CHALLENGER_SIZE, CHALLENGER_SIZE, 3)
    assert tuple(second.pixels[0, 0, 0]) == COLOURS[0] == tuple(batch.pixels[0, 0, 0])

    encoded = decode_batch(uris, InputSpec("image", SIZE, SIZE), challenger=InputSpec("bytes"))
    assert encoded.challenger is not None and encoded.challenger.pixels is None
    assert encoded.challenger.encoded == [Path(uris[i]).read_bytes() for i in (0, 2, 3)]


# -- the spec, the command line and the job spec ----------------------------------------------


def test_a_spec_with_a_challenger_is_checked(tmp_path):
    base = {"manifest": "m.csv", "model": "m", "output": "o"}
    JobSpec(**base, challenger="c").validate()
    with pytest.raises(UsageError, match="--top-k 1 or more"):
        JobSpec(**base, challenger="c", top_k=0, outputs=["e"]).validate()
    with pytest.raises(UsageError, match="needs --challenger"):
        JobSpec(**base, challenger_version=2).validate()
    with pytest.raises(UsageError, match="the champion itself"):
        JobSpec(**base, model_version=1, challenger="m/", challenger_version=1).validate()
    spec = JobSpec(**base, challenger="c")
    with pytest.raises(UsageError, match="challenger_top1_label"):
        spec.check_columns(("uri", "challenger_top1_label"))
    assert JobSpec.from_dict(spec.to_dict()) == spec


def test_a_job_spec_file_and_the_client_take_a_challenger(tmp_path, image_model, challenger_model):
    from batchinf.client import Client

    manifest = _manifest(tmp_path, COLOURS[:2], bad=False)
    (tmp_path / "nightly.yaml").write_text(
        f"name: pair\nmanifest: {manifest}\nmodel: {image_model}\noutput: {tmp_path}/o\n"
        f"challenger: {challenger_model}\nchallenger_version: 1\n")
    client = Client(str(tmp_path / "store"))
    spec = client.build_spec(str(tmp_path / "nightly.yaml"), date="2026-12-02")
    assert (spec.challenger, spec.challenger_version) == (challenger_model, 1)
    client.check(spec)


def test_submit_refuses_a_challenger_it_cannot_rank_or_a_bad_size_in_one_line(
        tmp_path, image_model):
    wrong_labels = make_challenger_model(str(tmp_path / "wrong-labels"))
    (tmp_path / "wrong-labels" / "labels.txt").write_text("red\ngreen\n")
    cases = [
        (["--challenger", str(tmp_path / "nowhere")], 1, "nowhere"),
        (["--challenger", wrong_labels], 1, "labels"),
        (["--challenger-version", "2"], 2, "--challenger-version needs --challenger"),
        (["--memory-per-replica", "lots"], 2, "a size such as 2GiB"),
        (["--challenger", image_model, "--top-k", "0", "--outputs", "scores"], 2,
         "--top-k 1 or more"),
    ]
    for options, code, says in cases:
        done = submit_one_row(tmp_path, "--model", image_model, *options)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == code and len(lines) == 1 and says in lines[0], (options, done.stderr)
        assert lines[0].startswith("batchinf: ")
    assert not os.path.exists(tmp_path / "store" / "jobs")  # nothing was queued


# -- the schema and the plan ---------------------------------------------------------------------


def test_the_challenger_columns_sit_beside_the_champions():
    names = output_schema(["uri"], challenger=True).names
    assert names == ["uri", "predictions", "top1_label", "top1_score", "challenger_predictions",
                     "challenger_top1_label", "challenger_top1_score", "error", "error_kind",
                     "model_name", "model_version", "challenger_model_name",
                     "challenger_model_version", "job_id"]
    assert set(CHALLENGER_COLUMNS) <= set(names)
    assert not set(CHALLENGER_COLUMNS) & set(output_schema(["uri"]).names)


def test_a_replica_reserves_its_memory_and_placement_counts_it():
    spec = JobSpec("m.csv", "m", "o", replicas_max=3, replicas_min=2)
    roomy = [NodeView("n0", {"CPU": 4.0, "memory": 8 * GiB}, {"CPU": 4.0, "memory": 8 * GiB})]
    p = plan(roomy, spec, memory=2 * GiB)
    assert p.replicas_now == 3 and p.replica_memory == 2 * GiB and "memory" not in p.replica
    assert all(b["memory"] == 2 * GiB for b in p.bundles()[:3])
    assert "memory" not in p.bundles()[-1]  # decode reserves no model memory
    tight = [NodeView("n0", {"CPU": 4.0, "memory": 5 * GiB}, {"CPU": 4.0, "memory": 5 * GiB})]
    p = plan(tight, spec, memory=2 * GiB)
    assert p.replicas_now == 2 and "waiting for 1 of 3 replicas" in (p.waiting or "")
    small = [NodeView("n0", {"CPU": 4.0, "memory": 1 * GiB}, {"CPU": 4.0, "memory": 1 * GiB})]
    with pytest.raises(Infeasible, match=r"'memory': '2.0 GiB'"):
        plan(small, spec, memory=2 * GiB)
    untold = [NodeView("n0", {"CPU": 4.0}, {"CPU": 4.0})]  # a node type that names no memory
    assert plan(untold, spec, memory=2 * GiB).replicas_now == 3


def test_memory_per_replica_takes_a_size_and_a_spec_key(tmp_path, image_model):
    from batchinf.client import Client, parse_size

    assert parse_size("2GiB") == 2 * GiB and parse_size("1500MiB") == 1500 * 2**20
    assert parse_size("3G") == 3e9 and parse_size(4096) == 4096
    with pytest.raises(UsageError, match="a size such as 2GiB"):
        parse_size("lots")
    manifest = write_manifest(tmp_path / "m.csv", ["uri"], [["a.png"]])
    (tmp_path / "spec.yaml").write_text(f"name: big\nmanifest: {manifest}\nmodel: {image_model}\n"
                                        f"output: {tmp_path}/o\nmemory_per_replica: 6GiB\n")
    client = Client(str(tmp_path / "store"))
    assert client.build_spec(str(tmp_path / "spec.yaml")).memory_per_replica == 6 * GiB
    with pytest.raises(UsageError, match="--memory-per-replica must be a size above 0"):
        client.build_spec(manifest, model=image_model, output=str(tmp_path / "o"),
                          memory_per_replica="0GiB")


def test_the_memory_estimate_follows_the_models_and_the_batch(tmp_path, image_model):
    source = resolve_model(image_model)
    files = MODEL_BYTES_FACTOR * saved_model_bytes(source) + MODEL_OVERHEAD_BYTES
    one = replica_memory([(source, 224 * 224)], 64)
    assert one == pytest.approx(REPLICA_RUNTIME_BYTES + files + ACTIVATION_COPIES * 64 * 224 * 224 * 12)
    assert 1.9 * GiB < one < 2.3 * GiB  # MobileNetV2 at batch 64 peaked at 2,016 MB here
    two = replica_memory([(source, 224 * 224), (source, 32 * 32)], 64)
    assert two == pytest.approx(one + files)  # the models run one after the other
    assert replica_memory([(source, 0)], 64) == one  # encoded files: taken as 224x224
    assert replica_memory([(source, 224 * 224)], 128) > one


# -- whole jobs on Ray -------------------------------------------------------------------------


def test_a_job_with_a_challenger_writes_both_models_top_k_side_by_side(
        ray_local, image_model, challenger_model, tmp_path):
    from batchinf.pipeline import run_job

    output = str(tmp_path / "out")
    spec = JobSpec(_manifest(tmp_path, COLOURS), image_model, output, top_k=3, batch_size=4,
                   shard_size=4, challenger=challenger_model)
    summary = run_job("job-pair", spec).summary
    rows = pq.read_table(output).to_pylist()
    assert len(rows) == len(COLOURS) + 1
    for row, colour in zip(rows, COLOURS, strict=False):
        assert [(p["label"], p["score"]) for p in row["predictions"]] == [
            (label, pytest.approx(score, abs=1e-5)) for label, score in expected_topk(colour, 3)]
        assert [(p["label"], p["score"]) for p in row["challenger_predictions"]] == [
            (label, pytest.approx(score, abs=1e-5))
            for label, score in expected_challenger_topk(colour, 3)]
        assert row["challenger_top1_label"] == expected_challenger_topk(colour, 1)[0][0]
        assert (row["model_version"], row["challenger_model_name"],
                row["challenger_model_version"]) == ("2", "swapped", "1")
    broken = rows[-1]
    assert broken["error_kind"] == "not_an_image"
    assert broken["challenger_predictions"] is None and broken["challenger_top1_label"] is None

    assert summary["challenger_model"]["name"] == "swapped"
    compared = summary["challenger"]
    flipped = [r for r in rows[:-1] if r["top1_label"] != r["challenger_top1_label"]]
    assert compared["rows_compared"] == len(COLOURS)  # the broken row is compared by neither
    assert compared["rows_agreed"] == len(COLOURS) - len(flipped) and flipped
    assert compared["agreement"] == pytest.approx(1 - len(flipped) / len(COLOURS), abs=1e-4)
    pairs = {(f["champion"], f["challenger"]): f for f in compared["flips"]}
    assert ("red", "green") in pairs and ("green", "red") in pairs  # the swap, both ways
    red_uris = [r["uri"] for r in flipped if r["top1_label"] == "red"]
    assert pairs[("red", "green")]["rows"] == len(red_uris)
    assert set(pairs[("red", "green")]["examples"]) <= set(red_uris)
    speed = summary["model_throughput"]
    assert set(speed) == {"champion", "challenger"}
    assert all(s["model_seconds"] > 0 and s["images_per_model_second"] > 0 for s in speed.values())
    both = [resolve_model(image_model), resolve_model(challenger_model)]
    activations = ACTIVATION_COPIES * 4 * CHALLENGER_SIZE**2 * 3 * 4  # the larger input, batch 4
    expected = (REPLICA_RUNTIME_BYTES + activations + 2 * MODEL_OVERHEAD_BYTES
                + MODEL_BYTES_FACTOR * sum(saved_model_bytes(s) for s in both))
    assert summary["resources"]["replica_memory"] == pytest.approx(expected)


def test_a_challenger_that_takes_encoded_files_agrees_with_the_same_weights(
        ray_local, image_model, bytes_model, tmp_path):
    from batchinf.pipeline import run_job

    output = str(tmp_path / "out")
    spec = JobSpec(_manifest(tmp_path, COLOURS, bad=False), image_model, output, top_k=2,
                   batch_size=3, challenger=bytes_model)
    run_job("job-bytes", spec)
    rows = pq.read_table(output).to_pylist()
    assert [r["challenger_top1_label"] for r in rows] == [r["top1_label"] for r in rows]
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["challenger"]["agreement"] == 1.0 and summary["challenger"]["flips"] == []
    page = (tmp_path / "out" / "_report.html").read_text()
    assert "Champion and challenger" in page
    assert all(r["challenger_model_version"] is None for r in rows)  # a bare SavedModel folder


# -- a model on S3 ------------------------------------------------------------------------------


def test_a_model_on_s3_is_loaded_from_a_copy_that_is_removed_at_once(
        s3_endpoint, bucket, image_model, tmp_path, monkeypatch):
    import tempfile

    from batchinf import storage
    from batchinf.decode import decode_batch
    from batchinf.predictor import Predictor

    storage.upload_folder(image_model, f"s3://{bucket}/models/colour")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the copy goes
    predictor = Predictor(resolve_model(f"s3://{bucket}/models/colour"), top_k=1)
    assert not list(tmp_path.glob("batchinf-model-*"))  # a replica killed later leaves nothing
    image = write_solid_image(str(tmp_path / "red.png"), COLOURS[0])
    found = predictor.predict(decode_batch([image], predictor.info.input))
    assert int(found.class_ids[0][0]) == 0  # red, from the restored weights

