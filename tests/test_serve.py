"""``batchinf serve`` over real HTTP on 127.0.0.1: answers, errors, batching, auth, shutdown.

One server (with a bearer token, its model on the moto S3 server) answers most tests; the
shutdown tests start their own. Every server runs the real CLI on its own local Ray.
"""

from __future__ import annotations

import glob
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from batchinf import storage
from batchinf.job import JobSpec
from batchinf.pipeline import run_job
from tests.conftest import COLOURS, write_manifest
from tests.models import LABELS, expected_topk
from tests.serving import Server, start_server

TOKEN = f"tok-{uuid.uuid4().hex}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(image_model: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    from batchinf.storage import s3_client

    bucket = f"serve-{uuid.uuid4().hex[:8]}"
    s3_client().create_bucket(Bucket=bucket)
    storage.upload_folder(image_model, f"s3://{bucket}/models/colour")
    running = start_server(f"s3://{bucket}/models/colour", "--max-batch-size", "8",
                           "--batch-wait-ms", "20", folder=tmp_path_factory.mktemp("serve"),
                           env={"BATCHINF_SERVE_TOKEN": TOKEN})
    yield running
    running.stop()


def png(rgb: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (20, 12), rgb).save(out, "PNG")
    return out.getvalue()


def classify(server: Server, body: bytes | None = None, *, files: dict | None = None,
             content_type: str = "image/png", query: str = "", name: str = "colour",
             headers: dict | None = None) -> requests.Response:
    sent = {**AUTH, **({} if files else {"Content-Type": content_type}), **(headers or {})}
    return requests.post(f"{server.url}/v1/models/{name}:classify{query}", data=body,
                         files=files, headers=sent, timeout=60)


def test_multipart_upload_gets_the_exact_ranked_classes(server):
    colour = (250, 120, 5)
    answer = classify(server, files={"file": ("o.png", png(colour), "image/png")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == {"name": "colour", "version": "2"}
    assert [p["label"] for p in body["predictions"]] == [label for label, _ in expected_topk(colour, 5)]
    assert [p["score"] for p in body["predictions"]] == pytest.approx(
        [score for _, score in expected_topk(colour, 5)], abs=1e-6)
    assert [p["rank"] for p in body["predictions"]] == [1, 2, 3, 4, 5]
    assert all(LABELS[p["class_id"]] == p["label"] for p in body["predictions"])


def test_raw_body_with_top_k_gives_the_best_k(server):
    full = classify(server, png(COLOURS[3])).json()["predictions"]
    for content_type in ("image/png", "application/octet-stream"):
        answer = classify(server, png(COLOURS[3]), content_type=content_type, query="?top_k=2")
        assert answer.status_code == 200 and answer.json()["predictions"] == full[:2]


def test_a_tie_goes_to_the_lower_class_id_as_in_parquet(server):
    # grey (128,128,128): "red" (id 0) and "green" (id 1) differ only by bias; a stable sort
    # ranks equal scores by class id, the rule the batch output follows.
    ranked = classify(server, png((128, 128, 128))).json()["predictions"]
    scores = [p["score"] for p in ranked]
    assert scores == sorted(scores, reverse=True)
    for first, second in zip(ranked, ranked[1:], strict=False):
        if first["score"] == second["score"]:
            assert first["class_id"] < second["class_id"]


def test_online_scores_equal_the_batch_jobs_parquet(server, ray_local, image_model, tmp_path):
    rng = np.random.default_rng(7)
    rows, bodies = [], []
    for i, (w, h) in enumerate([(37, 23), (64, 64), (120, 80), (9, 200), (8, 8)]):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        rows.append([str(path)])
        bodies.append(path.read_bytes())
    output = str(tmp_path / "out")
    run_job("job-online", JobSpec(write_manifest(tmp_path / "m.csv", ["uri"], rows), image_model,
                                  output, top_k=5, batch_size=3))
    batch = [row["predictions"] for row in pq.read_table(output).to_pylist()]
    online = [classify(server, body, content_type="image/jpeg").json()["predictions"]
              for body in bodies]
    # Same classes, ranks and labels exactly; scores to float32's last bit, which the model's
    # matmul may round differently for a batch of 1 than of 3.
    assert [[(p["rank"], p["class_id"], p["label"]) for p in row] for row in online] == \
        [[(p["rank"], p["class_id"], p["label"]) for p in row] for row in batch]
    for mine, theirs in zip(online, batch, strict=True):
        assert [p["score"] for p in mine] == pytest.approx([p["score"] for p in theirs], rel=1e-6)


@pytest.mark.parametrize(
    ("body", "content_type", "query", "status", "kind"),
    [
        (b"<html>not an image</html>", "image/png", "", 400, "not_an_image"),
        (png((1, 2, 3))[:-30], "image/png", "", 400, "corrupt_image"),
        (b"", "image/png", "", 400, "empty"),
        (b"abc", "text/plain", "", 415, "unsupported_media_type"),
        (png((1, 2, 3)), "image/png", "?top_k=0", 422, "bad_request"),
        (png((1, 2, 3)), "image/png", "?top_k=five", 422, "bad_request"),
    ],
    ids=["html", "truncated", "empty", "text", "top_k_zero", "top_k_word"],
)
def test_bad_input_gets_a_json_error_and_the_server_stays_up(server, body, content_type, query,
                                                              status, kind):
    answer = classify(server, body, content_type=content_type, query=query)
    assert answer.status_code == status
    assert answer.json()["error_kind"] == kind and answer.json()["error"]
    assert classify(server, png((9, 9, 9))).status_code == 200


def test_a_form_without_a_file_field_is_refused(server):
    answer = classify(server, files={"image": ("o.png", png((1, 2, 3)), "image/png")})
    assert answer.status_code == 400 and "'file'" in answer.json()["error"]


def test_an_unknown_model_name_gets_404(server):
    assert classify(server, png((1, 2, 3)), name="resnet").status_code == 404
    assert requests.get(f"{server.url}/v1/models/resnet", headers=AUTH, timeout=10).status_code == 404


def _post_raw(server: Server, headers: dict[str, str], chunks: Iterator[bytes]) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=120)
    connection.putrequest("POST", "/v1/models/colour:classify")
    for key, value in {**AUTH, "Content-Type": "image/jpeg", **headers}.items():
        connection.putheader(key, value)
    connection.endheaders()
    for chunk in chunks:
        try:
            connection.send(chunk)
        except OSError:  # the server may close once it has refused
            break
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_a_body_declared_over_64_mib_is_refused_before_it_is_sent(server):
    status, body = _post_raw(server, {"Content-Length": str(64 * 2**20 + 1)}, iter(()))
    assert status == 413 and body["error_kind"] == "too_large"


def test_a_streamed_body_over_64_mib_is_refused(server):
    block = b"\xff" * 2**20

    def chunked() -> Iterator[bytes]:
        for _ in range(65):
            yield b"%x\r\n%s\r\n" % (len(block), block)
        yield b"0\r\n\r\n"

    status, body = _post_raw(server, {"Transfer-Encoding": "chunked"}, chunked())
    assert status == 413 and body["error_kind"] == "too_large"
    assert classify(server, png((9, 9, 9))).status_code == 200


def test_model_route_reports_version_and_signature(server):
    info = requests.get(f"{server.url}/v1/models/colour/metadata", headers=AUTH, timeout=10).json()
    assert info["model"] == {"name": "colour", "version": "2"}
    assert info["signature"]["inputs"]["image"]["shape"] == [None, 8, 8, 3]
    assert info["signature"]["inputs"]["image"]["dtype"] == "float32"
    assert info["classes"] == 5 and info["batching"] == {"max_batch_size": 8, "batch_wait_ms": 20.0}


def test_the_openapi_page_lists_every_route(server):
    spec = requests.get(f"{server.url}/openapi.json", headers=AUTH, timeout=10).json()
    assert {"/healthz", "/v1/models/{name}", "/v1/models/{name}:classify"} <= set(spec["paths"])
    body = spec["paths"]["/v1/models/{name}:classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/octet-stream"} <= set(body)
    assert requests.get(f"{server.url}/docs", headers=AUTH, timeout=10).status_code == 200


def test_concurrent_requests_share_model_calls(server):
    bodies = [png(COLOURS[i % len(COLOURS)]) for i in range(96)]
    with ThreadPoolExecutor(16) as clients:
        answers = list(clients.map(lambda body: classify(server, body), bodies))
    assert {a.status_code for a in answers} == {200}
    sizes = [int(a.headers["X-Batch-Size"]) for a in answers]
    assert max(sizes) > 1 and max(sizes) <= 8
    for answer, body in zip(answers, bodies, strict=True):  # each got its own image's answer
        colour = COLOURS[bodies.index(body) % len(COLOURS)]
        assert answer.json()["predictions"][0]["label"] == expected_topk(colour, 1)[0][0]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {TOKEN}"}], ids=["none", "wrong", "basic"])
def test_every_route_but_healthz_needs_the_token(server, headers):
    assert classify(server, png((1, 2, 3)), headers={"Authorization": None} | headers).status_code == 401
    for path in ("/v1/models/colour", "/openapi.json", "/docs"):
        answer = requests.get(f"{server.url}{path}", headers=headers, timeout=10)
        assert answer.status_code == 401 and answer.json()["error_kind"] == "unauthorized"
    assert requests.get(f"{server.url}/healthz", headers=headers, timeout=10).status_code == 200


def test_the_token_appears_in_no_log(server):
    classify(server, png((1, 2, 3)), headers={"Authorization": "Bearer wrong"})
    found = re.search(r"logs in (\S+)", server.output())
    assert found, server.output()
    logs = [p for p in glob.glob(os.path.join(found.group(1), "**"), recursive=True)
            if os.path.isfile(p)]
    assert any("replica" in p for p in logs)
    for text in [server.output(), *(Path(p).read_text(errors="replace") for p in logs)]:
        assert TOKEN not in text


def _serve_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "BATCHINF_SERVE_TOKEN"}
    return subprocess.run([sys.executable, "-m", "batchinf.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120, env={**clean, **(env or {})})


def test_another_host_without_a_token_refuses_to_start(image_model):
    done = _serve_command("--model", image_model, "--host", "0.0.0.0")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "BATCHINF_SERVE_TOKEN" in done.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--model", "/nonexistent/model"], "no SavedModel"),
    (["--replicas", "0"], "--replicas"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--address", "http://head:8265"], "Jobs API"),
])
def test_a_bad_command_line_gets_one_clear_line(image_model, args, says):
    done = _serve_command("--model", image_model, *args)
    assert done.returncode != 0 and says in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_it_cleanly_and_leaves_no_ray_process(image_model, tmp_path, how):
    running = start_server(image_model, folder=tmp_path)
    assert len(running.tree) >= 3  # Ray's own processes, the proxy and the replica
    assert classify(running, png((0, 0, 255))).status_code == 200
    code, seconds = running.stop(how)
    assert code == 0, running.output()
    assert seconds < 30, running.output()
    assert running.left_behind() == []
    assert f"stopping ({how.name})" in running.output()
