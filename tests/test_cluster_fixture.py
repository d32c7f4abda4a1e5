"""The multi-node test cluster itself: nodes, custom resources, placement, a lost node.

Drivers run in subprocesses: this test process may already be connected to the session's
one-node cluster, and Ray keeps one connection (and one auth token) per process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from tests.cluster import LocalCluster, own_processes

NODES_AND_PLACEMENT = """
import json, ray
ray.init(log_to_driver=False)

@ray.remote(num_cpus=0, resources={"gpu_node": 1})
class OnGpuNode:
    def node_id(self):
        return ray.get_runtime_context().get_node_id()

alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
print(json.dumps({"alive": alive, "actor_node": ray.get(OnGpuNode.remote().node_id.remote())}))
ray.shutdown()
"""

NODE_ALIVE = """
import json, ray
ray.init(log_to_driver=False)
print(json.dumps({n["NodeID"]: n["Alive"] for n in ray.nodes()}))
ray.shutdown()
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A CPU-less head, a plain 1-CPU node and a 1-CPU node with the ``gpu_node`` resource."""
    with LocalCluster() as c:
        c.start_head(num_cpus=0)
        c.add_nodes((1, None), (1, {"gpu_node": 1}))
        temp_dirs = [n.temp_dir for n in c.nodes]
        yield c
    assert not own_processes(temp_dirs, set())
    assert not any(os.path.exists(d) for d in temp_dirs)


def test_three_nodes_with_their_resources_and_placement(cluster: LocalCluster) -> None:
    head, plain, gpu = cluster.nodes
    seen = json.loads(cluster.run_python(NODES_AND_PLACEMENT).splitlines()[-1])

    alive = seen["alive"]
    assert set(alive) == {head.node_id, plain.node_id, gpu.node_id}
    assert alive[head.node_id].get("CPU", 0) == 0
    assert alive[plain.node_id]["CPU"] == 1 and "gpu_node" not in alive[plain.node_id]
    assert alive[gpu.node_id]["CPU"] == 1 and alive[gpu.node_id]["gpu_node"] == 1
    assert seen["actor_node"] == gpu.node_id
    assert not (head.pids & plain.pids or head.pids & gpu.pids or plain.pids & gpu.pids)


def test_killed_node_is_seen_dead(cluster: LocalCluster) -> None:
    head, plain, gpu = cluster.nodes
    started = time.monotonic()
    cluster.kill(plain)
    cluster.wait_for_dead(plain, timeout=15)
    assert time.monotonic() - started < 15

    assert not plain.pids and head.pids and gpu.pids
    assert cluster.alive_node_ids() == {head.node_id, gpu.node_id}
    alive = json.loads(cluster.run_python(NODE_ALIVE).splitlines()[-1])
    assert alive[plain.node_id] is False and alive[gpu.node_id] is True
