"""The planner on a table of cluster shapes: every demand fits whole on some node."""

from __future__ import annotations

import pytest

from batchinf.job import JobSpec
from batchinf.planner import (
    DECODE_CPUS_PER_GPU,
    Infeasible,
    NodeView,
    Plan,
    model_streams,
    plan,
    replan,
)
from batchinf.settings import Settings


def spec(**kw: object) -> JobSpec:
    return JobSpec("m.csv", "model", "out", **kw)  # type: ignore[arg-type]


def nodes(*shapes: dict[str, float], used: dict[int, dict[str, float]] | None = None) -> list[NodeView]:
    """Node views from resource dicts; ``used`` takes resources off some nodes' free share."""
    views = []
    for i, shape in enumerate(shapes):
        free = dict(shape)
        for key, value in (used or {}).get(i, {}).items():
            free[key] = free.get(key, 0.0) - value
        views.append(NodeView(f"n{i}", dict(shape), free))
    return views


def fits(p: Plan, views: list[NodeView]) -> bool:
    """Replay the plan's placement: no node gives more than it has free."""
    free = {v.node_id: dict(v.free) for v in views}
    for node_id, items in p.placement.items():
        for item in items:
            demand = p.replica if item == "replica" else {"CPU": p.decode_cpus}
            for key, value in demand.items():
                free[node_id][key] = free[node_id].get(key, 0.0) - value
    return all(value >= -1e-9 for room in free.values() for value in room.values())


SHAPES = {
    "embedded, 2 CPUs": [{"CPU": 2}],
    "one small node": [{"CPU": 1}],
    "head 1 CPU + worker 1 CPU": [{"CPU": 1}, {"CPU": 1, "gpu_node": 1}],
    "head 0 CPUs + two 1-CPU workers": [{"CPU": 0}, {"CPU": 1}, {"CPU": 1}],
    "8-CPU GPU node beside a 16-CPU CPU node": [{"CPU": 0}, {"CPU": 8, "GPU": 1}, {"CPU": 16}],
    "many small nodes": [{"CPU": 1}] * 10,
    "one big node": [{"CPU": 64}],
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_replicas_and_decode_fit_whole_on_nodes(shape: str, replicas: int) -> None:
    views = nodes(*SHAPES[shape])
    p = plan(views, spec(replicas_min=replicas, replicas_max=replicas))
    assert p.replicas_now == replicas and p.waiting is None
    assert p.placement and fits(p, views)
    assert p.decode_tasks >= 1 and p.decode_cpus * p.decode_tasks >= 0.5 - 1e-9


def test_the_deadlocked_two_node_case_now_plans_half_cpu_replicas() -> None:
    views = nodes({"CPU": 1}, {"CPU": 1, "gpu_node": 1})
    p = plan(views, spec(replicas_min=2, replicas_max=2))
    assert p.replica_cpus == 0.5 and p.decode_cpus == 0.5 and fits(p, views)
    assert sorted(p.placement) == ["n0", "n1"]  # one replica on each node


def test_one_replica_on_the_embedded_two_cpus_takes_what_decode_leaves_and_two_threads() -> None:
    p = plan(nodes({"CPU": 2}), spec())
    assert (p.replica_cpus, p.decode_cpus, p.decode_tasks, p.tf_threads) == (1.5, 0.5, 1, 2)
    assert p.model_streams == 2  # each batch in two parts of one thread each
    assert p.max_in_flight == 4


def test_model_streams_one_per_thread_up_to_four_and_one_on_a_gpu() -> None:
    assert [model_streams(t) for t in (1, 2, 3, 4, 16)] == [1, 2, 3, 4, 4]
    assert model_streams(8, gpu=True) == 1
    assert plan(nodes({"CPU": 8, "GPU": 1}), spec(gpus_per_replica=1.0)).model_streams == 1
    assert plan(nodes({"CPU": 1}), spec()).model_streams == 1
    p = plan(nodes({"CPU": 2}), spec(), settings=Settings(model_streams=1))
    assert (p.model_streams, p.tf_threads, p.max_in_flight) == (1, 2, 4)


def test_cpus_per_replica_caps_the_replica_and_leaves_the_rest_free() -> None:
    p = plan(nodes({"CPU": 8}), spec(cpus_per_replica=1.0))
    assert (p.replica_cpus, p.decode_cpus, p.tf_threads) == (1.0, 0.5, 1)


def test_an_asked_decode_share_is_kept_before_replicas_grow() -> None:
    p = plan(nodes({"CPU": 4}), spec(decode_cpus=2.0))
    assert (p.replica_cpus, p.decode_cpus * p.decode_tasks) == (2.0, 2.0)


def test_gpu_replicas_go_to_gpu_nodes_and_decode_stays_off_them() -> None:
    views = nodes({"CPU": 0}, {"CPU": 8, "GPU": 1}, {"CPU": 16})
    p = plan(views, spec(gpus_per_replica=1.0))
    assert p.placement["n1"] == ["replica"] and p.replica_gpus == 1.0
    assert p.placement["n2"] == ["decode"] * int(DECODE_CPUS_PER_GPU)
    assert p.avoid_nodes == ("n1",)


def test_fractional_gpus_put_several_replicas_on_one_gpu() -> None:
    views = nodes({"CPU": 8, "GPU": 1}, {"CPU": 16})
    p = plan(views, spec(replicas_min=4, replicas_max=4, gpus_per_replica=0.25))
    assert p.placement["n0"] == ["replica"] * 4 and fits(p, views)


def test_decode_uses_gpu_nodes_cpus_when_nothing_else_has_any() -> None:
    views = nodes({"CPU": 0}, {"CPU": 8, "GPU": 1})
    p = plan(views, spec(gpus_per_replica=1.0))
    assert p.placement["n1"].count("decode") == 4 and p.avoid_nodes == ()


def test_replica_resources_pin_replicas_to_the_node_type_that_has_them() -> None:
    views = nodes({"CPU": 2}, {"CPU": 2, "gpu_node": 1})
    p = plan(views, spec(replica_resources={"gpu_node": 0.5}))
    assert p.placement["n1"][0] == "replica" and p.replica["gpu_node"] == 0.5


def test_tf_threads_follow_the_cpus_a_replica_reserved() -> None:
    assert plan(nodes({"CPU": 64}), spec(cpus_per_replica=4.0)).tf_threads == 4
    assert plan(nodes({"CPU": 1}), spec()).tf_threads == 1  # 0.5 CPU still gets one thread


def test_a_gpu_demand_no_node_or_node_type_has_fails_at_once_naming_it() -> None:
    with pytest.raises(Infeasible, match=r"needs \{'CPU': 0.1, 'GPU': 1.0\}.*offer \{'CPU': 1.0\}"):
        plan(nodes({"CPU": 1}, {"CPU": 1}), spec(gpus_per_replica=1.0))


def test_a_cluster_whose_only_node_has_no_cpus_is_infeasible() -> None:
    with pytest.raises(Infeasible):
        plan(nodes({"CPU": 0}), spec())


def test_an_autoscaler_node_type_makes_the_demand_wait_instead_of_fail() -> None:
    p = plan(nodes({"CPU": 0}), spec(gpus_per_replica=1.0), node_types=[{"CPU": 8, "GPU": 1}])
    assert p.replicas_now == 0 and "autoscaler" in (p.waiting or "")


def test_a_job_beside_a_running_one_plans_from_what_is_free() -> None:
    views = nodes({"CPU": 4}, used={0: {"CPU": 2}})
    p = plan(views, spec())
    assert p.replica_cpus * p.replicas_now + p.decode_cpus * p.decode_tasks <= 2 + 1e-9
    assert fits(p, views)


def test_when_nothing_is_free_the_job_waits_and_says_why() -> None:
    p = plan(nodes({"CPU": 2}, used={0: {"CPU": 2}}), spec())
    assert p.replicas_now == 0 and p.replica == {"CPU": 1.5}
    assert (p.waiting or "").startswith("waiting for resources held by other jobs")


def test_min_max_starts_with_what_fits_and_says_what_waits() -> None:
    views = nodes({"CPU": 8, "GPU": 1}, {"CPU": 16})
    p = plan(views, spec(replicas_min=1, replicas_max=2, gpus_per_replica=1.0))
    assert p.replicas_now == 1 and p.replicas_max == 2
    assert p.waiting == "waiting for 1 of 2 replicas: needs {'CPU': 1.0, 'GPU': 1.0}"


def test_bundles_reserve_the_replicas_that_fit_now_and_every_decode_task() -> None:
    p = plan(nodes({"CPU": 4}), spec(replicas_min=2, replicas_max=2, decode_cpus=2.0))
    assert p.bundles() == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]


def test_settings_reach_the_plan_and_the_environment_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    knobs = Settings(fetch_threads=4, tf_threads=3, model_streams=2, decode_nice=0)
    p = plan(nodes({"CPU": 2}), spec(), settings=knobs)
    assert (p.fetch_threads, p.tf_threads, p.model_streams, p.decode_nice) == (4, 3, 2, 0)
    gone = {"CPU": 2.0}
    again = replan(nodes({"CPU": 0}, {"CPU": 2}), spec(), gone, settings=knobs)
    assert again is not None and (again.fetch_threads, again.tf_threads) == (4, 3)
    monkeypatch.setenv("BATCHINF_FETCH_THREADS", "4")  # the planner is pure: only its arguments
    monkeypatch.setenv("BATCHINF_TF_THREADS", "3")
    p = plan(nodes({"CPU": 2}), spec())
    assert (p.fetch_threads, p.tf_threads) == (16, 2)


def test_more_minimum_replicas_than_the_nodes_can_ever_hold_is_infeasible() -> None:
    with pytest.raises(Infeasible, match="3 replica"):
        plan(nodes({"CPU": 0}, {"CPU": 8, "GPU": 1}), spec(replicas_min=3, replicas_max=3,
                                                           gpus_per_replica=1.0))


def test_a_replan_after_a_lost_node_keeps_the_replica_size_and_runs_fewer() -> None:
    """Head 1 CPU + worker 1 CPU planned 2 x 0.5; the worker is lost: one replica goes on."""
    p = replan(nodes({"CPU": 1}), spec(replicas_min=2, replicas_max=2), {"CPU": 0.5})
    assert (p.replicas_now, p.replica, p.decode_cpus, p.decode_tasks) == (1, {"CPU": 0.5}, 0.5, 1)
    assert p.waiting == "waiting for 1 of 2 replicas: needs {'CPU': 0.5}"


def test_a_replan_on_a_node_too_small_for_the_old_size_plans_afresh_on_it() -> None:
    views = nodes({"CPU": 1})
    p = replan(views, spec(replicas_min=3, replicas_max=3), {"CPU": 1.5})
    assert p.replicas_now == 3 and p.replica_cpus < 1.5 and fits(p, views)


def test_a_replan_without_the_pinned_node_type_waits_for_it_instead_of_failing() -> None:
    pinned = spec(replica_resources={"gpu_node": 1.0})
    gone = {"CPU": 1.0, "gpu_node": 1.0}
    p = replan(nodes({"CPU": 0}, {"CPU": 1}), pinned, gone, node_types=[gone])
    assert p.replicas_now == 0 and p.replica == gone and "need {'CPU': 1.0, 'gpu_node': 1.0}" in (
        p.waiting or "")
