"""An S3 API for the bench: moto's standalone server in its own process on 127.0.0.1.

``serve_bucket`` starts it, fills a bucket with the bench's images (and a manifest that lists
them by ``s3://`` URI) and its model folder, and yields the standard AWS variables that point
boto3 (and so batchinf) at it, the same code path as MinIO.
"""

from __future__ import annotations

import contextlib
import csv
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, server: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"moto server exited with {server.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise SystemExit("moto server did not start listening")


def _upload(client: object, bucket: str, manifest: str, model: str, model_key: str) -> None:
    put = client.upload_file  # type: ignore[attr-defined]
    rows = []
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        for row in reader:
            key = f"images/{Path(row['uri']).name}"
            put(row["uri"], bucket, key)
            rows.append({**row, "uri": f"s3://{bucket}/{key}"})
    listing = Path(manifest).with_name("manifest-s3.csv")
    with open(listing, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    put(str(listing), bucket, "images/manifest.csv")
    for path in Path(model).rglob("*"):
        if path.is_file():
            put(str(path), bucket, f"{model_key}/{path.relative_to(model).as_posix()}")


@contextlib.contextmanager
def serve_bucket(bucket: str, manifest: str, model: str, model_key: str) -> Iterator[dict[str, str]]:
    """Yield AWS variables for a moto server holding ``bucket`` with images and model."""
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, server)
        env = {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}
        os.environ.update(env)  # boto3 below, in this process, reads the same chain
        client = boto3.client("s3")
        client.create_bucket(Bucket=bucket)
        started = time.monotonic()
        _upload(client, bucket, manifest, model, model_key)
        print(f"moto server at {endpoint}: bucket filled in {time.monotonic() - started:.1f}s")
        yield env
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)
