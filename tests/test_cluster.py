"""Jobs on a real multi-node Ray cluster: placement, a CPU-less head, node loss, infeasible
demands and pending reasons. The cluster (``tests/cluster.py``) is a head with no CPUs and
1-CPU worker nodes on this machine, one with the ``gpu_node`` resource standing in for a GPU
node type; the dispatcher runs as its own process against the head's Jobs API, as on a
deployed cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq
import pytest
import requests

from batchinf.job import Job, JobSpec, JobState
from batchinf.jobstore import JobStore
from tests.cluster import LocalCluster, served_store
from tests.conftest import numbered_images, until
from tests.models import Gate, closed, gated_manifest, gated_model
from tests.serving import start_server

KNOBS = {
    "BATCHINF_RETRY_DELAY": "2",
    # A killed replica restarts and loads the model within it even on a loaded machine (it
    # took over 20 s at a load of 35 on two cores); also how long a job with none waits.
    "BATCHINF_REPLICA_LOSS_TIMEOUT": "60",
    "BATCHINF_STALL_TIMEOUT": "120",
    # What an autoscaler could add: 1-CPU "spot" nodes (tests add them by hand).
    "BATCHINF_NODE_TYPES": '[{"CPU": 1, "spot": 1}]',
}

ACTORS = """
import json, ray
from ray.util.state import list_actors
ray.init(log_to_driver=False)
found = list_actors(filters=[("class_name", "=", "Predictor")], limit=1000, detail=True)
print(json.dumps([{"name": a.name, "node_id": a.node_id, "pid": a.pid, "state": a.state}
                  for a in found]))
"""


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str) -> Iterator[LocalCluster]:
    """Started after the S3 server, so its nodes get its endpoint, as they would MinIO's."""
    with LocalCluster(env=KNOBS) as c:
        c.start_head(num_cpus=0)
        c.add_nodes((1, None), (1, {"gpu_node": 1}))
        yield c


@pytest.fixture(scope="module")
def store(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobStore]:
    """A job store served by ``batchinf dispatcher`` running against the cluster."""
    with served_store(cluster, str(tmp_path_factory.mktemp("cluster-store")), KNOBS) as store:
        yield store


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("cluster-images")
    return numbered_images(folder, 400, 90, 30)


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, tuple[Gate, ...]]:
    """The gated model (``tests/models.py``): a job whose manifest ends in rows of a gate's
    colour is mid-job, whatever the machine's speed, until the test opens that gate."""
    return gated_model(str(tmp_path_factory.mktemp("cluster-gated")))


@pytest.fixture()
def gate(gated: tuple[str, tuple[Gate, ...]]) -> Iterator[Gate]:
    """The first gate, closed for the test."""
    with closed(gated[1]):
        yield gated[1][0]


def finished(store: JobStore, job: Job, timeout: float = 300.0) -> Job:
    return until(lambda: (j := store.get(job.job_id)).state.terminal and j, timeout)


def rows(output: str) -> list[str]:
    return sorted(pq.read_table(output, columns=["n"]).column("n").to_pylist(), key=int)


def replicas(cluster: LocalCluster, job: Job) -> list[dict[str, Any]]:
    """The job's predictor actors as the state API lists them (name, node, pid, state)."""
    actors = json.loads(cluster.run_python(ACTORS).splitlines()[-1])
    return [a for a in actors if (a["name"] or "").startswith(job.job_id)]


def replica_nodes(cluster: LocalCluster, job: Job) -> list[str]:
    return [a["node_id"] for a in replicas(cluster, job)]


def test_replicas_spread_across_nodes_and_the_cpu_less_head_takes_none(
    cluster: LocalCluster, store: JobStore, image_model: str, images: str, tmp_path: Any
) -> None:
    job, _ = store.create(JobSpec(images, image_model, str(tmp_path / "out"), replicas_min=2,
                                  replicas_max=2, batch_size=16, shard_size=100))
    done = finished(store, job)
    assert done.state is JobState.SUCCEEDED, done.error
    assert rows(str(tmp_path / "out")) == [str(i) for i in range(400)]
    head, plain, gpu = cluster.nodes[:3]
    assert sorted(replica_nodes(cluster, job)) == sorted([plain.node_id, gpu.node_id])
    assert done.summary["resources"]["replica"] == {"CPU": 0.5}


SERVE_ACTORS = """
import json, ray
from ray.util.state import list_actors
ray.init(log_to_driver=False)
found = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
print(json.dumps([{"class": a.class_name, "node_id": a.node_id} for a in found
                  if a.class_name.startswith(("ServeReplica", "ServeController", "ProxyActor"))]))
"""


def test_serve_spreads_replicas_over_workers_and_leaves_the_cluster_as_it_was(
    cluster: LocalCluster, image_model: str, tmp_path
):
    running = start_server(image_model, "--address", cluster.gcs_address, "--replicas", "2",
                           folder=tmp_path, base_env=cluster.client_env())
    answer = requests.post(f"{running.url}/v1/models/colour:classify", timeout=60,
                           files={"file": ("o.png", _png((0, 0, 255)), "image/png")})
    assert answer.json()["predictions"][0]["label"] == "blue"
    actors = json.loads(cluster.run_python(SERVE_ACTORS))
    replicas = {a["node_id"] for a in actors if a["class"].startswith("ServeReplica")}
    assert len(replicas) == 2 and cluster.head.node_id not in replicas
    assert [a["node_id"] for a in actors if a["class"] == "ProxyActor"] == [cluster.head.node_id]
    code, _ = running.stop(signal.SIGTERM)
    assert code == 0, running.output()
    assert until(lambda: json.loads(cluster.run_python(SERVE_ACTORS)) == [], timeout=60)


def test_serve_refuses_a_cluster_whose_serve_listens_elsewhere(cluster: LocalCluster, image_model):
    start = "import ray; from ray import serve; ray.init(); serve.start(http_options={0})"
    cluster.run_python(start.format('{"host": "127.0.0.1", "port": 18911}'))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "batchinf.cli", "serve", "--model", image_model, "--address",
             cluster.gcs_address, "--port", "18912"],
            env=cluster.client_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        assert "Serve already runs on this cluster at 127.0.0.1:18911" in done.stderr.splitlines()[-1]
    finally:
        cluster.run_python("import ray; from ray import serve; ray.init(); serve.shutdown()")


def _png(rgb: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (20, 12), rgb).save(out, "PNG")
    return out.getvalue()


def test_replica_resources_pin_replicas_to_the_node_that_has_them(
    cluster: LocalCluster, store: JobStore, image_model: str, images: str, tmp_path: Any
) -> None:
    job, _ = store.create(JobSpec(images, image_model, str(tmp_path / "out"), batch_size=32,
                                  replica_resources={"gpu_node": 1.0}))
    done = finished(store, job)
    assert done.state is JobState.SUCCEEDED, done.error
    assert replica_nodes(cluster, job) == [cluster.nodes[2].node_id]


def test_an_infeasible_demand_fails_fast_naming_it(
    store: JobStore, image_model: str, images: str, tmp_path: Any
) -> None:
    started = time.monotonic()
    job, _ = store.create(JobSpec(images, image_model, str(tmp_path / "out"), gpus_per_replica=1.0))
    done = finished(store, job, timeout=120)
    assert done.state is JobState.FAILED and done.error["type"] == "Infeasible"
    assert "'GPU': 1.0" in done.error["message"] and done.attempt == 1  # not retried
    assert time.monotonic() - started < 60


def test_a_job_on_s3_is_read_and_written_from_the_worker_nodes(
    store: JobStore, image_model: str, images: str, bucket: str
) -> None:
    """Everything on S3: the manifest, the model, 60 images and the output. The head has no
    CPUs, so every GET of an image is a decode task's on a worker node."""
    import csv
    import io

    from batchinf import storage
    from tests.models import expected_topk

    with open(images, newline="", encoding="utf-8") as f:
        local = [row["uri"] for row in csv.DictReader(f)][:60]
    rows = []
    for i, path in enumerate(local):
        with open(path, "rb") as image:
            storage.write_bytes(f"s3://{bucket}/img/{i}.png", image.read())
        rows.append(f"s3://{bucket}/img/{i}.png,{i}\n")
    storage.write_bytes(f"s3://{bucket}/m.csv", ("uri,n\n" + "".join(rows)).encode())
    storage.upload_folder(image_model, f"s3://{bucket}/models/colour")
    output = f"s3://{bucket}/out"
    job, _ = store.create(JobSpec(f"s3://{bucket}/m.csv", f"s3://{bucket}/models/colour", output,
                                  replicas_min=2, replicas_max=2, batch_size=8, shard_size=25))
    done = finished(store, job)
    assert done.state is JobState.SUCCEEDED and done.rows_failed == 0, done.error
    parts = [n for n in storage.list_names(output) if n.endswith(".parquet")]
    got = [row for part in sorted(parts) for row in pq.read_table(
        io.BytesIO(storage.read_bytes(f"{output}/{part}"))).to_pylist()]
    assert [row["n"] for row in got] == [str(i) for i in range(60)]
    assert all(row["predictions"][0]["label"] == expected_topk((i % 256, 90, 30), 1)[0][0]
               for i, row in enumerate(got))


def test_a_replica_that_cannot_be_placed_shows_why_and_the_job_goes_on(
    store: JobStore, gated: Any, gate: Gate, images: str, tmp_path: Any
) -> None:
    manifest = gated_manifest(images, tmp_path / "m.csv", (40, None), (8, gate))  # held to ask
    job, _ = store.create(JobSpec(manifest, gated[0], str(tmp_path / "out"), batch_size=2,
                                  replicas_min=1, replicas_max=2,
                                  replica_resources={"gpu_node": 1.0}))
    seen = until(lambda: (w := store.get(job.job_id).waiting or "").startswith("waiting for") and w)
    assert seen == "waiting for 1 of 2 replicas: needs {'CPU': 1.0, 'gpu_node': 1.0}"
    status = subprocess.run([sys.executable, "-m", "batchinf.cli", "status", job.job_id,
                             "--store", store.root], capture_output=True, text=True)
    assert "waiting   waiting for 1 of 2 replicas" in status.stdout
    assert store.get(job.job_id).rows_total == 48  # known before the job can end
    gate.open()
    assert finished(store, job).state is JobState.SUCCEEDED


def test_a_replica_process_killed_mid_job_is_restarted_and_its_batches_redone(
    cluster: LocalCluster, store: JobStore, gated: Any, gate: Gate, images: str, tmp_path: Any
) -> None:
    output = str(tmp_path / "out")
    manifest = gated_manifest(images, tmp_path / "m.csv", (40, None), (20, gate))
    job, _ = store.create(JobSpec(manifest, gated[0], output, batch_size=1, shard_size=20))
    (replica,) = until(lambda: [a for a in replicas(cluster, job) if a["state"] == "ALIVE"])
    until(lambda: (j := store.get(job.job_id)).rows_done >= 40 and j.waiting is None)
    os.kill(replica["pid"], signal.SIGKILL)  # its batches at the gate die with it
    assert store.get(job.job_id).rows_done == 40  # killed mid-job
    gate.open()
    done = finished(store, job)
    assert done.state is JobState.SUCCEEDED and done.attempt == 1, done.error
    assert rows(output) == [str(i) for i in range(60)] and done.rows_failed == 0
    assert done.summary["batches_redone"] >= 1


def test_a_worker_node_lost_mid_job_costs_no_row_and_no_error(
    cluster: LocalCluster, store: JobStore, gated: Any, gate: Gate, images: str, tmp_path: Any
) -> None:
    victim = cluster.add_node(1)
    output = str(tmp_path / "out")
    manifest = gated_manifest(images, tmp_path / "m.csv", (40, None), (30, gate))
    job, _ = store.create(JobSpec(manifest, gated[0], output, replicas_min=3, replicas_max=3,
                                  batch_size=1, shard_size=20))
    until(lambda: victim.node_id in replica_nodes(cluster, job))  # the state API is slow
    # Every replica holds the model and waits at the gate (nothing waits for a replica).
    until(lambda: (j := store.get(job.job_id)).rows_done >= 40 and j.waiting is None)
    cluster.kill(victim)  # its replica's batches at the gate die with it
    assert store.get(job.job_id).rows_done == 40  # the loss really was mid-job
    gate.open()
    done = finished(store, job)
    assert done.state is JobState.SUCCEEDED, done.error
    assert rows(output) == [str(i) for i in range(70)]
    assert done.rows_failed == 0 and done.summary["errors_by_kind"] == {}
    assert done.summary["batches_redone"] >= 1 and done.attempt == 1  # healed within the attempt


def test_every_replica_lost_is_retried_as_a_new_attempt_once_a_node_returns(
    cluster: LocalCluster, store: JobStore, gated: Any, gate: Gate, images: str, tmp_path: Any
) -> None:
    spot = cluster.add_nodes((1, {"spot": 1}), (1, {"spot": 1}))
    output = str(tmp_path / "out")
    manifest = gated_manifest(images, tmp_path / "m.csv", (40, None), (20, gate))
    job, _ = store.create(JobSpec(manifest, gated[0], output, batch_size=1, shard_size=20,
                                  replica_resources={"spot": 1.0}))
    until(lambda: store.get(job.job_id).rows_done >= 40)  # attempt 1 waits at the gate
    for node in spot:  # both spot nodes preempted: no node left that a replica may use
        cluster.kill(node)
    assert store.get(job.job_id).state is JobState.RUNNING
    retried = until(lambda: (j := store.get(job.job_id)).attempt == 2 and j.waiting and j)
    assert "waiting for the autoscaler to add a node" in retried.waiting
    assert retried.attempts[0]["reason"].startswith("InfrastructureError: no model replica")
    gate.open()
    cluster.add_node(1, {"spot": 1})  # what the autoscaler would do
    done = finished(store, job)
    assert done.state is JobState.SUCCEEDED and done.attempt == 2, done.error
    assert rows(output) == [str(i) for i in range(60)] and done.rows_failed == 0
