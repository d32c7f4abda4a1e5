"""Champion and challenger on a multi-node cluster: replicas holding both models spread over
the workers, and the memory they reserve decides how many fit on a node."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow.parquet as pq
import pytest

from batchinf.job import JobSpec, JobState
from tests.cluster import LocalCluster, served_store
from tests.conftest import COLOURS, until, write_manifest
from tests.models import (
    expected_challenger_topk,
    expected_topk,
    make_challenger_model,
    write_solid_image,
)

# Each worker has room for one replica (the job asks 1 GiB each) and CPUs for more: only
# the memory reservation keeps a second one off it.
WORKER_MEMORY = int(1.5 * 2**30)


@pytest.fixture(scope="module")
def challenger_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_challenger_model(str(tmp_path_factory.mktemp("models") / "swapped"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A CPU-less head and two 2-CPU workers, each with memory for one two-model replica."""
    with LocalCluster(env={"BATCHINF_STALL_TIMEOUT": "120"}) as c:
        c.start_head(num_cpus=0)
        c.add_nodes((2, {"memory": WORKER_MEMORY}), (2, {"memory": WORKER_MEMORY}))
        yield c


def test_on_a_cluster_replicas_hold_both_models_and_their_memory_places_them(
        cluster, image_model, challenger_model, tmp_path):
    rows = [[write_solid_image(str(tmp_path / "img" / f"{i}.png"), c)] for i, c in enumerate(COLOURS)]
    manifest = write_manifest(tmp_path / "m.csv", ["uri"], rows * 10 + [[str(tmp_path / "none.png")]])
    (tmp_path / "store").mkdir()
    with served_store(cluster, str(tmp_path / "store"), {}) as store:
        job, _ = store.create(JobSpec(manifest, image_model, str(tmp_path / "out"), top_k=2,
                                      batch_size=8, shard_size=16, replicas_min=2, replicas_max=4,
                                      challenger=challenger_model, challenger_version=1,
                                      memory_per_replica=2**30))
        done = until(lambda: (j := store.get(job.job_id)).state.terminal and j, 300)
    assert done.state is JobState.SUCCEEDED, done.error
    plan = done.summary["resources"]
    # 4 replicas of 0.5 CPU would fit on the CPUs; the memory holds one a worker
    assert plan["replicas_now"] == 2 and plan["replica_memory"] == 2**30
    assert sorted(v.count("replica") for v in plan["placement"].values()) == [1, 1]
    rows = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert len(rows) == len(COLOURS) * 10 + 1
    for row, colour in zip(rows, COLOURS * 10, strict=False):
        assert row["top1_label"] == expected_topk(colour, 1)[0][0]
        assert row["challenger_top1_label"] == expected_challenger_topk(colour, 1)[0][0]
    assert done.summary["challenger"]["rows_compared"] == len(COLOURS) * 10
