"""The resource plan: replicas and decode always both fit, whatever the user asks for."""

from __future__ import annotations

import pytest

from batchinf.errors import UsageError
from batchinf.job import JobSpec
from batchinf.pool import DECODE_CPUS_PER_GPU, plan_resources


def spec(**kw: object) -> JobSpec:
    return JobSpec("m.csv", "model", "out", **kw)  # type: ignore[arg-type]


def test_one_cpu_replica_on_two_cpus_leaves_one_for_decode() -> None:
    plan = plan_resources({"CPU": 2.0}, spec())
    assert (plan.replica_cpus, plan.decode_cpus, plan.decode_tasks) == (1.0, 1.0, 1)
    assert plan.max_in_flight == 4  # two per replica (running + next) and one per decode task


@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("cpus", [1.0, 2.0, 4.0])
def test_replicas_never_take_the_decode_cpus(replicas: int, cpus: float) -> None:
    plan = plan_resources({"CPU": cpus}, spec(replicas_min=replicas, replicas_max=replicas,
                                                cpus_per_replica=2.0))
    assert replicas * plan.replica_cpus + plan.decode_cpus <= cpus + 1e-9
    assert plan.decode_cpus >= min(1.0, cpus / 2)
    assert plan.max_in_flight >= 2 * replicas + 1


def test_gpu_replicas_get_decode_cpus_per_gpu() -> None:
    plan = plan_resources({"CPU": 16.0, "GPU": 2.0}, spec(replicas_min=2, replicas_max=2,
                                                          gpus_per_replica=1.0))
    assert plan.replica_gpus == 1.0
    assert plan.decode_tasks == int(2 * DECODE_CPUS_PER_GPU)
    assert plan.max_in_flight == 2 * 2 + plan.decode_tasks + 1


def test_decode_cpus_option_is_capped_by_what_the_replicas_leave() -> None:
    plan = plan_resources({"CPU": 4.0}, spec(decode_cpus=10.0))
    assert plan.decode_tasks == 3  # 4 CPUs, one replica holding one
    assert plan_resources({"CPU": 8.0}, spec(decode_cpus=2.0)).decode_tasks == 2


def test_fetch_and_tf_threads_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHINF_FETCH_THREADS", "4")
    monkeypatch.setenv("BATCHINF_TF_THREADS", "2")
    plan = plan_resources({"CPU": 2.0}, spec())
    assert (plan.fetch_threads, plan.tf_threads) == (4, 2)


def test_decode_cpus_must_be_positive() -> None:
    with pytest.raises(UsageError, match="--decode-cpus"):
        spec(decode_cpus=0.0).validate()
