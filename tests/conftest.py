"""Shared real parts: moto's S3 server over HTTP on 127.0.0.1 and one local Ray instance.

The S3 server starts first and its endpoint goes into the standard AWS variables, so Ray's
worker processes (started afterwards) inherit them, exactly as they would for MinIO.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    yield endpoint
    server.stop()


@pytest.fixture()
def bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the moto server; its name."""
    from batchinf.storage import s3_client

    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_head(s3_endpoint: str) -> Iterator[Any]:
    """A real one-node Ray cluster (``ray start --head`` on free ports) for the session."""
    from batchinf.raycluster import start_head

    head = start_head(num_cpus=2)
    yield head
    head.stop()


@pytest.fixture(scope="session")
def ray_local(ray_head: Any) -> Iterator[Any]:
    """This test process connected to the session's Ray cluster (ray.init costs seconds)."""
    import ray

    ray.init(address=ray_head.gcs_address, log_to_driver=False)
    yield ray
    ray.shutdown()


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 200, 90), (128, 128, 128), (250, 120, 5)]


@pytest.fixture(scope="session")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Versions 1 and 2 of the fixed-weight mean-colour model, TF Serving layout."""
    from tests.models import make_image_model

    base = str(tmp_path_factory.mktemp("models") / "colour")
    make_image_model(base, version=1)
    make_image_model(base, version=2)
    return base


@pytest.fixture(scope="session")
def bytes_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.models import make_bytes_model

    return make_bytes_model(str(tmp_path_factory.mktemp("models") / "bytes"))


def write_manifest(path: Any, header: list[str], rows: list[list[str]]) -> str:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def numbered_images(folder: Any, count: int, green: int, blue: int) -> str:
    """``count`` small PNGs of shades of red under ``folder/img``, and a manifest of them with
    an ``n`` column numbering the rows."""
    from tests.models import write_solid_image

    rows = []
    for i in range(count):
        write_solid_image(str(folder / "img" / f"{i}.png"), (i % 256, green, blue))
        rows.append([str(folder / "img" / f"{i}.png"), str(i)])
    return write_manifest(folder / "manifest.csv", ["uri", "n"], rows)


def repeated_manifest(manifest: str, times: int, path: Any) -> str:
    """The manifest's images ``times`` over, numbered on: a longer job from the same files."""
    import csv

    with open(manifest, newline="", encoding="utf-8") as f:
        uris = [row["uri"] for row in csv.DictReader(f)]
    every = [[uri, str(n)] for n, uri in enumerate(uris * times)]
    return write_manifest(path, ["uri", "n"], every)


@pytest.fixture()
def colour_images(tmp_path: Any) -> tuple[str, list[tuple[int, int, int]]]:
    """A manifest of 12 solid-colour PNGs (relative paths) with two pass-through columns."""
    from tests.models import write_solid_image

    colours = [COLOURS[i % len(COLOURS)] for i in range(12)]
    rows = []
    for i, colour in enumerate(colours):
        write_solid_image(str(tmp_path / "img" / f"{i}.png"), colour)
        rows.append([f"img/{i}.png", f"{i:03d}", f"note, {i}"])
    return write_manifest(tmp_path / "manifest.csv", ["uri", "id", "note"], rows), colours


def until(predicate: Any, timeout: float = 240.0, every: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something true (that value), or fail the test."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def drive(dispatcher: Any, job_id: str, timeout: float = 180.0, every: float = 1.0) -> Any:
    """Run dispatcher rounds until the job ends; its final record."""

    def ended() -> Any:
        dispatcher.tick()
        job = dispatcher.store.get(job_id)
        return job if job.state.terminal else None

    return until(ended, timeout, every=every)
