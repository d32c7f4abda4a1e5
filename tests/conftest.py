"""Shared real parts: moto's S3 server over HTTP on 127.0.0.1 and one local Ray instance;
and the test tiers (docs/testing.md): every test is marked unit, ray, cluster or deploy here.

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

# --- Test tiers --------------------------------------------------------------------------------
# A test's tier is the heaviest thing it starts, read from the fixtures it requests, so a new
# test lands in the right tier without a marker of its own:
#   deploy   every test of tests/test_deploy.py (it installs the images' packages);
#   cluster  it requests a fixture of a module that builds a LocalCluster (tests/cluster.py);
#   ray      it requests a fixture in RAY_FIXTURES;
#   unit     anything else: no Ray process may start (scripts/test.sh --fast enforces it).
# STARTS_RAY lists what starts Ray where no fixture shows it: a ``batchinf`` subprocess with
# the embedded local head, ``batchinf serve``, a chaos run. A name there is a test or a fixture
# of that file; a name that matches nothing fails the run, so a rename cannot drop it.

TIERS = ("unit", "ray", "cluster", "deploy")
DEPLOY_FILES = {"test_deploy.py"}
RAY_FIXTURES = {"ray_head", "ray_local"}
STARTS_RAY: dict[str, str] = {
    "test_bench.py::test_batchinf_entry_runs_the_product_and_reports_its_rows": "ray",
    "test_chaos.py::test_a_short_chaos_run_loses_and_doubles_no_row": "cluster",
    "test_cli.py::test_submit_wait_json_writes_parquet_that_pandas_pyarrow_and_duckdb_read": "ray",
    "test_cli.py::test_submit_wait_off_a_terminal_logs_plain_progress_lines": "ray",
    "test_cli.py::test_a_job_over_its_error_budget_exits_1_with_one_line_on_stderr": "ray",
    "test_embedded.py::shell": "ray",
    "test_faults.py::test_a_whole_job_on_s3_through_faults_loses_no_row_and_writes_none_twice": "ray",
    "test_secrets.py::test_planted_credentials_and_the_ray_token_appear_in_nothing_the_job_leaves": "ray",
    "test_serve.py::server": "ray",
    "test_serve_protocols.py::server": "ray",
    "test_serve_protocols.py::bytes_server": "ray",
    "test_serve.py::test_a_signal_stops_it_cleanly_and_leaves_no_ray_process": "ray",
}


def _builds_a_cluster(fixturedef: Any) -> bool:
    from tests.cluster import LocalCluster

    return getattr(fixturedef.func, "__globals__", {}).get("LocalCluster") is LocalCluster


def tier_of(item: pytest.Item) -> str:
    """The heaviest tier the test needs (the rule above)."""
    file = os.path.basename(str(item.path))
    if file in DEPLOY_FILES:
        return "deploy"
    names = set(getattr(item, "fixturenames", ())) | {getattr(item, "originalname", item.name)}
    defs = getattr(item, "_fixtureinfo", None)
    closure = defs.name2fixturedefs.values() if defs is not None else []
    if any(_builds_a_cluster(d) for chain in closure for d in chain):
        return "cluster"
    listed = {STARTS_RAY[f"{file}::{n}"] for n in names if f"{file}::{n}" in STARTS_RAY}
    if listed:
        return max(listed, key=TIERS.index)
    return "ray" if names & RAY_FIXTURES else "unit"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    modules: dict[str, Any] = {}
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):  # an explicit marker wins
            item.add_marker(getattr(pytest.mark, tier_of(item)))
        if getattr(item, "module", None) is not None:
            modules[os.path.basename(str(item.path))] = item.module
    stale = [key for key in STARTS_RAY
             if key.split("::")[0] in modules and not hasattr(modules[key.split("::")[0]], key.split("::")[1])]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py STARTS_RAY names what is not in its file: {stale}")


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


def submit_one_row(tmp_path: Any, *options: str) -> Any:
    """``batchinf submit`` of a one-row manifest to a store of its own, as a subprocess: for
    what submit refuses (it must queue nothing, so no dispatcher starts)."""
    import subprocess
    import sys

    manifest = write_manifest(tmp_path / "m.csv", ["uri"], [["a.png"]])
    env = {**os.environ, "BATCHINF_STORE": str(tmp_path / "store")}
    return subprocess.run([sys.executable, "-m", "batchinf.cli", "submit", manifest,
                           "--output", str(tmp_path / "out"), *options],
                          env=env, capture_output=True, text=True, timeout=120)


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
