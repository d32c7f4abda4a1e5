"""``batchinf serve`` speaking TF Serving's REST API and the Open Inference Protocol (v2).

The clients are not ours: NVIDIA's ``tritonclient.http`` with its defaults (binary tensor data
both ways), and plain HTTP requests shaped as TF Serving's REST documentation shows them. Their
answers are checked against the Parquet rows a batch job writes for the same images.

Two servers, one a kind of model input, each started once for the module (each costs a Ray
start): ``server`` serves an image-tensor model in two versions that see images differently,
with a bearer token; ``bytes_server`` serves a ``tf.string`` model, as TF Serving's Inception
export takes images.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from batchinf.decode import decode_image
from batchinf.job import JobSpec
from batchinf.pipeline import run_job
from tests.conftest import write_manifest
from tests.models import LABELS, SIZE, expected_topk, make_image_model, make_top_half_model
from tests.serving import Server, start_server

TOKEN = f"tok-{uuid.uuid4().hex}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SIZES = [(37, 23), (64, 64), (120, 80), (9, 200)]


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Version 1 scores an image's mean colour, version 2 the mean colour of its top half."""
    base = tmp_path_factory.mktemp("models") / "colour"
    make_image_model(str(base), version=1)
    top = make_top_half_model(str(tmp_path_factory.mktemp("top") / "top"))
    shutil.copytree(Path(top) / "1", base / "2")
    return str(base)


@pytest.fixture(scope="module")
def server(two_versions: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(two_versions, "--all-versions", "--max-batch-size", "8",
                           folder=tmp_path_factory.mktemp("serve"),
                           env={"BATCHINF_SERVE_TOKEN": TOKEN})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def bytes_server(bytes_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(bytes_model, folder=tmp_path_factory.mktemp("serve-bytes"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Noise JPEGs of several sizes and shapes: each is resized before the model sees it."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(11)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def parquet_rows(model: str, images: list[Path], folder: Path) -> list[list[dict]]:
    """The ``predictions`` a batch job writes for ``images``, in their order."""
    output = str(folder / "out")
    manifest = write_manifest(folder / "m.csv", ["uri"], [[str(p)] for p in images])
    run_job(f"job-{uuid.uuid4().hex[:6]}", JobSpec(manifest, model, output, top_k=5, batch_size=3))
    return [row["predictions"] for row in pq.read_table(output).to_pylist()]


@pytest.fixture(scope="module")
def batch_rows(ray_local, two_versions, images, tmp_path_factory) -> list[list[dict]]:
    return parquet_rows(two_versions, images, tmp_path_factory.mktemp("job"))


@pytest.fixture(scope="module")
def bytes_batch_rows(ray_local, bytes_model, images, tmp_path_factory) -> list[list[dict]]:
    return parquet_rows(bytes_model, images, tmp_path_factory.mktemp("job-bytes"))


def top5(scores: list[float]) -> list[tuple[int, str, float]]:
    """A score vector ranked as the Parquet rows are: best first, ties to the lower id."""
    order = np.argsort(-np.asarray(scores, np.float32), kind="stable")[:5]
    return [(int(i), LABELS[i], float(np.float32(scores[i]))) for i in order]


def assert_same_ranking(found: list[list[tuple[int, str, float]]], rows: list[list[dict]]) -> None:
    """Classes and labels exactly; scores to float32's last bit, which a model may round
    differently for a batch of one than for a batch of three."""
    assert [[(c, label) for c, label, _ in row] for row in found] == \
        [[(p["class_id"], p["label"]) for p in row] for row in rows]
    for mine, theirs in zip(found, rows, strict=True):
        assert [s for _, _, s in mine] == pytest.approx([p["score"] for p in theirs], rel=1e-6)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def pixels(path: Path) -> list:
    """What the image model's input takes: the image resized as a batch job resizes it, as
    float32 in the model's [0, 1] range. A TF Serving client sends the tensor itself."""
    return (decode_image(path.read_bytes(), SIZE, SIZE).astype(np.float32)
            * np.float32(1 / 255)).tolist()


def split_png(top: tuple[int, int, int], bottom: tuple[int, int, int]) -> bytes:
    image = Image.new("RGB", (16, 16), bottom)
    image.paste(Image.new("RGB", (16, 8), top), (0, 0))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


# --- TF Serving's REST API, requests as its documentation shows them ---------------------------


def test_model_status_lists_every_served_version(server):
    answer = requests.get(f"{server.url}/v1/models/colour", headers=AUTH, timeout=10)
    assert answer.status_code == 200
    assert answer.json() == {"model_version_status": [
        {"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        for v in ("2", "1")]}
    one = requests.get(f"{server.url}/v1/models/colour/versions/1", headers=AUTH, timeout=10).json()
    assert [s["version"] for s in one["model_version_status"]] == ["1"]
    missing = requests.get(f"{server.url}/v1/models/colour/versions/7", headers=AUTH, timeout=10)
    assert missing.status_code == 404 and "version 7" in missing.json()["error"]


def test_metadata_has_the_signature_def_and_batchinfs_description(server):
    info = requests.get(f"{server.url}/v1/models/colour/metadata", headers=AUTH, timeout=10).json()
    assert info["model_spec"] == {"name": "colour", "signature_name": "", "version": "2"}
    definition = info["metadata"]["signature_def"]["signature_def"]["serving_default"]
    image = definition["inputs"]["image"]
    assert image["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in image["tensor_shape"]["dim"]] == ["-1", "8", "8", "3"]
    assert definition["outputs"]["scores"]["dtype"] == "DT_FLOAT"
    assert info["model"] == {"name": "colour", "version": "2"} and info["versions"] == ["1", "2"]
    assert info["classes"] == 5 and info["batching"]["max_batch_size"] == 8
    older = requests.get(f"{server.url}/v1/models/colour/versions/1/metadata", headers=AUTH,
                         timeout=10).json()
    assert older["model_spec"]["version"] == "1" and older["model"]["version"] == "1"


def test_predict_rows_of_pixels_score_as_the_parquet(server, images, batch_rows):
    answer = requests.post(f"{server.url}/v1/models/colour:predict", headers=AUTH, timeout=60,
                           json={"instances": [pixels(p) for p in images]})
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]  # one output: its name is left out
    assert len(predictions) == len(images) and all(len(p) == 5 for p in predictions)
    assert_same_ranking([top5(p) for p in predictions], batch_rows)


def test_predict_columns_named_by_input_score_as_the_parquet(server, images, batch_rows):
    answer = requests.post(f"{server.url}/v1/models/colour/versions/2:predict", headers=AUTH,
                           timeout=60, json={"inputs": {"image": [pixels(p) for p in images]}})
    assert answer.status_code == 200, answer.text
    assert_same_ranking([top5(p) for p in answer.json()["outputs"]], batch_rows)


def test_predict_b64_strings_for_a_string_input_score_as_the_parquet(bytes_server, images,
                                                                     bytes_batch_rows):
    # TF Serving's documented form: curl -d '{"instances": [{"b64": "..."}]}' (form-encoded type)
    body = json.dumps({"instances": [{"b64": b64(p)} for p in images]})
    answer = requests.post(f"{bytes_server.url}/v1/models/bytes:predict", data=body, timeout=60,
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 200, answer.text
    assert_same_ranking([top5(p) for p in answer.json()["predictions"]], bytes_batch_rows)
    named = requests.post(f"{bytes_server.url}/v1/models/bytes:predict", timeout=60,
                          json={"instances": [{"image_bytes": {"b64": b64(images[0])}}]})
    assert named.json()["predictions"] == answer.json()["predictions"][:1]


def test_classify_examples_answer_label_score_pairs_as_the_parquet(server, images, batch_rows):
    answer = requests.post(f"{server.url}/v1/models/colour:classify", headers=AUTH, timeout=60,
                           json={"examples": [{"image": {"b64": b64(p)}} for p in images]})
    assert answer.status_code == 200, answer.text
    result = answer.json()["result"]
    found = [[(LABELS.index(label), label, score) for label, score in row] for row in result]
    assert_same_ranking(found, batch_rows)


def test_classify_still_takes_an_image_and_a_version(server, images, batch_rows):
    for version, expected in (("", batch_rows[0]), ("/versions/2", batch_rows[0])):
        answer = requests.post(f"{server.url}/v1/models/colour{version}:classify", timeout=60,
                               headers={**AUTH, "Content-Type": "image/jpeg"},
                               data=images[0].read_bytes())
        assert answer.status_code == 200, answer.text
        assert [p["class_id"] for p in answer.json()["predictions"]] == \
            [p["class_id"] for p in expected]


def test_each_version_answers_at_its_own_path(server):
    # red over blue: version 1 sees the mean (purple), version 2 the top half only (red)
    image = split_png((255, 0, 0), (0, 0, 255))
    red, purple = expected_topk((255, 0, 0), 1)[0][0], expected_topk((127, 0, 127), 1)[0][0]
    assert red != purple
    labels = {}
    for path in ("", "/versions/1", "/versions/2"):
        answer = requests.post(f"{server.url}/v1/models/colour{path}:classify", timeout=60,
                               headers={**AUTH, "Content-Type": "image/png"}, data=image)
        assert answer.status_code == 200, answer.text
        labels[path] = answer.json()["predictions"][0]["label"]
        assert answer.json()["model"]["version"] == (path.rsplit("/", 1)[-1] or "2")
    assert labels == {"": red, "/versions/1": purple, "/versions/2": red}


@pytest.mark.parametrize(("body", "says"), [
    ({"instances": [{"b64": "aGVsbG8="}]}, "pixels"),
    ({"instances": [[1.0, 2.0]]}, "refused the input"),
    ({"instances": [], "inputs": []}, "not both"),
    ({"inputs": {"pixels": []}}, "'image'"),
    ({"signature_name": "classify", "instances": [[1.0]]}, "serving_default"),
], ids=["b64-for-pixels", "wrong-shape", "both", "wrong-name", "signature"])
def test_a_bad_predict_request_gets_a_json_error(server, body, says):
    answer = requests.post(f"{server.url}/v1/models/colour:predict", headers=AUTH, json=body,
                           timeout=60)
    assert answer.status_code == 400 and says in answer.json()["error"], answer.text


def test_unknown_versions_and_models_get_404(server):
    for path in ("/v1/models/colour/versions/3:predict", "/v1/models/resnet:predict",
                 "/v2/models/colour/versions/3/infer"):
        answer = requests.post(f"{server.url}{path}", headers=AUTH, json={"instances": [1]},
                               timeout=60)
        assert answer.status_code == 404 and answer.json()["error_kind"] == "not_found", path


# --- the Open Inference Protocol, through NVIDIA's tritonclient with its defaults --------------


def auth() -> dict[str, str]:
    """A fresh copy: tritonclient adds its Inference-Header-Content-Length to the dict it gets."""
    return dict(AUTH)


def triton_client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)


def image_input(images: list[Path], name: str = "image") -> triton.InferInput:
    tensor = triton.InferInput(name, [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.read_bytes() for p in images], dtype=np.object_))
    return tensor


def test_tritonclient_sees_a_live_ready_server_and_its_model(server):
    client = triton_client(server)
    assert client.is_server_live() and client.is_server_ready()  # no token needed for health
    assert client.is_model_ready("colour", headers=auth())
    assert client.is_model_ready("colour", "1", headers=auth())
    assert not client.is_model_ready("colour", "3", headers=auth())
    assert not client.is_model_ready("colour")  # no token
    meta = client.get_model_metadata("colour", headers=auth())
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 5]}]
    extensions = client.get_server_metadata(headers=auth())["extensions"]
    assert {"classification", "binary_tensor_data"} <= set(extensions)


def test_tritonclient_classification_strings_match_the_parquet(server, images, batch_rows):
    result = triton_client(server).infer(
        "colour", [image_input(images)], headers=auth(),
        outputs=[triton.InferRequestedOutput("scores", class_count=5)])
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] > 0
    strings = result.as_numpy("scores")
    assert strings.shape == (len(images), 5)
    found = []
    for row in strings:
        parts = [s.decode().split(":") for s in row]
        found.append([(int(index), label, float(np.float32(score))) for score, index, label in parts])
    assert_same_ranking(found, batch_rows)


def test_tritonclient_raw_scores_without_outputs_named(server, images, batch_rows):
    # no outputs named: tritonclient asks for every output in binary (binary_data_output)
    result = triton_client(server).infer("colour", [image_input(images)], headers=auth(),
                                         request_id="r-1")
    assert result.get_response()["id"] == "r-1"
    assert result.get_response()["model_version"] == "2"
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32 and scores.shape == (len(images), 5)
    assert_same_ranking([top5(list(row)) for row in scores], batch_rows)


def test_tritonclient_picks_a_version(server):
    one = triton.InferInput("image", [1], "BYTES")
    one.set_data_from_numpy(np.array([split_png((255, 0, 0), (0, 0, 255))], dtype=np.object_))
    top = [triton.InferRequestedOutput("scores", class_count=1)]
    labels = {v: triton_client(server).infer("colour", [one], model_version=v, outputs=top,
                                             headers=auth()).as_numpy("scores")[0][0].decode()
              .split(":")[2] for v in ("1", "2")}
    assert labels == {"1": expected_topk((127, 0, 127), 1)[0][0],
                      "2": expected_topk((255, 0, 0), 1)[0][0]}


def test_tritonclient_gets_the_error_of_a_bad_image(server):
    bad = triton.InferInput("image", [2], "BYTES")
    bad.set_data_from_numpy(np.array([split_png((1, 2, 3), (4, 5, 6)), b"<html>no</html>"],
                                     dtype=np.object_))
    with pytest.raises(InferenceServerException, match="image 1: not an image"):
        triton_client(server).infer("colour", [bad], headers=auth())


def test_tritonclient_with_a_string_input_model(bytes_server, images, bytes_batch_rows):
    result = triton_client(bytes_server).infer(
        "bytes", [image_input(images, "image_bytes")],
        outputs=[triton.InferRequestedOutput("scores", class_count=5)])
    found = [[(int(i), label, float(s)) for s, i, label in (x.decode().split(":") for x in row)]
             for row in result.as_numpy("scores")]
    assert_same_ranking(found, bytes_batch_rows)


# --- the Open Inference Protocol in plain JSON ---------------------------------------------------


def test_v2_json_request_with_base64_images(server, images, batch_rows):
    body = {"id": "json-1",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "parameters": {"content_type": "base64"}, "data": [b64(p) for p in images]}],
            "outputs": [{"name": "scores", "parameters": {"classification": 3}}]}
    answer = requests.post(f"{server.url}/v2/models/colour/infer", headers=AUTH, json=body,
                           timeout=60)
    assert answer.status_code == 200, answer.text
    assert "Inference-Header-Content-Length" not in answer.headers
    doc = answer.json()
    assert doc["id"] == "json-1" and doc["model_name"] == "colour" and doc["model_version"] == "2"
    (output,) = doc["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [len(images), 3]
    rows = [output["data"][i * 3:(i + 1) * 3] for i in range(len(images))]
    assert [[int(s.split(":")[1]) for s in row] for row in rows] == \
        [[p["class_id"] for p in row[:3]] for row in batch_rows]


def test_v2_health_needs_no_token_but_models_do(server):
    for path in ("/v2/health/live", "/v2/health/ready"):
        answer = requests.get(f"{server.url}{path}", timeout=10)
        assert answer.status_code == 200 and answer.content == b""
    assert requests.get(f"{server.url}/v2/models/colour", timeout=10).status_code == 401
    assert requests.get(f"{server.url}/v2/models/colour", headers=AUTH, timeout=10).status_code == 200


def test_the_openapi_page_lists_the_protocols_routes(server):
    paths = set(requests.get(f"{server.url}/openapi.json", headers=AUTH, timeout=10).json()["paths"])
    assert {"/v1/models/{name}:predict", "/v1/models/{name}/versions/{version}:predict",
            "/v1/models/{name}/metadata", "/v2/models/{name}/infer",
            "/v2/models/{name}/versions/{version}/infer", "/v2/health/ready"} <= paths


def test_versions_and_all_versions_together_are_refused(two_versions):
    done = subprocess.run([sys.executable, "-m", "batchinf.cli", "serve", "--model", two_versions,
                           "--all-versions", "--model-version", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--all-versions" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
