"""Planted credentials must appear nowhere a job leaves text: its output, summary, Parquet
metadata, job record, ``batchinf logs``, ``status``, error messages, the dispatcher's log, or
any file of the Ray session it ran in. The job runs the way a user's cron runs it: an async
``submit``, the embedded dispatcher and its local Ray head with token auth, S3 for everything.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq

from batchinf import storage
from bench.faultproxy import FaultProxy
from tests.conftest import write_manifest
from tests.models import write_solid_image
from tests.test_embedded import dispatchers

PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED" + uuid.uuid4().hex[:9].upper(),
    "AWS_SECRET_ACCESS_KEY": f"planted-secret-{uuid.uuid4().hex}",
    "AWS_SESSION_TOKEN": f"planted-session-{uuid.uuid4().hex}",
    "RAY_AUTH_TOKEN": os.urandom(32).hex(),  # the local head runs with token auth on
}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchinf.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def _texts_under(folder: str) -> dict[str, bytes]:
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found[path] = Path(path).read_bytes()
    return found


def test_planted_credentials_and_the_ray_token_appear_in_nothing_the_job_leaves(
    s3_endpoint, bucket, image_model, tmp_path
):
    for i in range(8):
        write_solid_image(str(tmp_path / "img" / f"{i}.png"), (30 * i, 90, 200))
    storage.upload_folder(str(tmp_path / "img"), f"s3://{bucket}/img")
    storage.upload_folder(image_model, f"s3://{bucket}/model")
    storage.write_bytes(f"s3://{bucket}/img/locked.png", (tmp_path / "img" / "0.png").read_bytes())
    rows = [[f"s3://{bucket}/img/{i}.png"] for i in range(8)]
    rows += [[f"s3://{bucket}/img/locked.png"], [f"s3://{bucket}/img/missing.png"]]
    local = write_manifest(tmp_path / "m.csv", ["uri"], rows)
    storage.write_bytes(f"s3://{bucket}/m.csv", Path(local).read_bytes())
    output, store = f"s3://{bucket}/out", str(tmp_path / "store")
    home = tmp_path / "home"
    home.mkdir()
    # The proxy answers 403 for locked.png: the planted credentials "may not" read it.
    with FaultProxy(s3_endpoint, forbid={"locked.png"}) as proxy:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **PLANTED,
               "AWS_ENDPOINT_URL": proxy.endpoint, "HOME": str(home), "BATCHINF_STORE": store,
               "RAY_AUTH_MODE": "token"}
        try:
            submitted = _cli(env, "submit", f"s3://{bucket}/m.csv", "--model",
                             f"s3://{bucket}/model", "--output", output, "--json")
            job_id = json.loads(submitted.stdout)["job_id"]
            waited = _cli(env, "wait", job_id)
            logs = _cli(env, "logs", job_id)
            status = _cli(env, "status", job_id, "--json")
            head = json.loads(Path(store, "local-head.json").read_text())
            ray_files = _texts_under(head["temp_dir"])  # before the head stops and removes them
        finally:
            for dispatcher in dispatchers(store):
                dispatcher.send_signal(signal.SIGTERM)
                dispatcher.wait(60)
    assert waited.returncode == 0, waited.stderr
    assert "Running" in logs.stdout or logs.stdout.strip(), logs.stderr  # the driver's real log
    parts = [n for n in storage.list_names(output) if n.endswith(".parquet")]
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/{parts[0]}")))
    kinds = sorted(k for k in table.column("error_kind").to_pylist() if k)
    assert kinds == ["access_denied", "not_found"]

    left: dict[str, bytes] = {
        "stdout+stderr": "".join(c.stdout + c.stderr for c in (submitted, waited, logs, status)).encode(),
        "parquet metadata": json.dumps({str(k): str(v) for k, v in (table.schema.metadata or {}).items()}).encode(),
        **{f"{output}/{n}": storage.read_bytes(f"{output}/{n}") for n in storage.list_names(output)},
        **_texts_under(store),
        **ray_files,
        "dispatcher log": (home / ".batchinf-dispatcher.log").read_bytes(),
    }
    assert any("raylet" in path for path in left) and any("job-driver" in p for p in left)
    assert b"token: the RAY_AUTH_TOKEN environment variable" in left["dispatcher log"]
    secrets = [v.encode() for k, v in PLANTED.items() if k != "AWS_ACCESS_KEY_ID"]
    for secret in secrets:
        leaks = [where for where, data in left.items() if secret in data]
        assert leaks == [], f"{secret[:14]!r}... found in {leaks[:5]}"
