"""A store after many nights: what reading it costs, paging through history, pruning it.

Costs are counted as requests through a fault-free proxy in front of moto's server, the way an
object store bills them: they must follow the jobs asked about, not the store's history.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from batchinf import storage
from batchinf.dispatcher import Dispatcher
from batchinf.job import JobSpec, JobState, transition
from batchinf.jobstore import JobStore
from bench.faultproxy import FaultProxy


def spec(n: int, **overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {"output": f"/out/{n}", **overrides}
    return JobSpec(manifest="s3://in/m.csv", model="/models/m", **fields)


def finish(store: JobStore, job_id: str, state: JobState = JobState.SUCCEEDED,
           now: float | None = None) -> None:
    store.claim(job_id, f"{job_id}-a1")
    store.update(job_id, lambda j: transition(j, state, now=now))


def history(store: JobStore, finished: int, *, start: float = 1_000_000.0,
            name: str = "nightly") -> list[str]:
    """``finished`` SUCCEEDED jobs, one a day from ``start``; their ids, oldest first."""
    ids = []
    for n in range(finished):
        key = f"{name}-{n}"
        job, _ = store.create(spec(n, idempotency_key=key, output=f"/out/{key}"),
                              now=start + 86400 * n)
        finish(store, job.job_id, now=start + 86400 * n + 3600)
        ids.append(job.job_id)
    return ids


@pytest.fixture()
def counted(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], FaultProxy]]:
    """Send this process's S3 requests through a new counting proxy (no faults)."""
    proxies: list[FaultProxy] = []

    def start() -> FaultProxy:
        proxy = FaultProxy(s3_endpoint)
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        storage.configure(None)  # a new client, for the proxy
        return proxy

    yield start
    storage.configure(None)  # the next client is made for the endpoint monkeypatch restores
    for proxy in proxies:
        proxy.close()


def requests(proxy: FaultProxy, call: Callable[[], object]) -> int:
    before = proxy.counts["requests"]
    call()
    return proxy.counts["requests"] - before


def costs(proxy: FaultProxy, root: str, finished: int) -> tuple[int, int, int, int]:
    """Requests for: list the QUEUED jobs, an idle dispatcher round, a create, a status."""
    store = JobStore.from_uri(root)
    history(store, finished)
    queued, _ = store.create(spec(999))
    reader = JobStore.from_uri(root)  # a new process: it checks the index marker once
    listed = requests(proxy, lambda: reader.list({JobState.QUEUED}))
    assert [j.job_id for j in reader.list({JobState.QUEUED})] == [queued.job_id]
    idle = Dispatcher(JobStore.from_uri(root), address=None)
    idle.tick()  # the first round checks the marker; an idle round after it costs:
    store.request_cancel(queued.job_id)
    tick = requests(proxy, idle.tick)
    create = requests(proxy, lambda: store.create(spec(1000)))
    status = requests(proxy, lambda: store.get(queued.job_id))
    return listed, tick, create, status


def test_reading_what_is_active_costs_the_same_with_5_or_30_finished_jobs(bucket, counted):
    proxy = counted()
    few, many = (costs(proxy, f"s3://{bucket}/store{n}", n) for n in (5, 30))
    assert few == many
    listed, tick, create, status = few
    assert listed <= 4 and tick <= 2 and create <= 6 and status == 1, few


def test_list_pages_through_history_newest_first(bucket):
    store = JobStore.from_uri(f"s3://{bucket}/store")
    ids = history(store, 7)
    failed, _ = store.create(spec(50), now=1_000_000.0 + 86400 * 3.5)
    finish(store, failed.job_id, JobState.FAILED)
    first, more = store.page(limit=3)
    assert [j.job_id for j in first] == [ids[6], ids[5], ids[4]] and more == ids[4]
    second, more = store.page(limit=3, before=more)
    assert [j.job_id for j in second] == [failed.job_id, ids[3], ids[2]]
    last, more = store.page(limit=3, before=more)
    assert [j.job_id for j in last] == [ids[1], ids[0]] and more is None
    assert store.page({JobState.FAILED}) == ([store.get(failed.job_id)], None)


def test_prune_removes_old_finished_records_only_and_never_an_output(tmp_path):
    store = JobStore.from_uri(str(tmp_path / "store"))
    output = tmp_path / "out" / "0"
    output.mkdir(parents=True)
    (output / "part-00000.parquet").write_bytes(b"PAR1")
    old = history(store, 3, start=1_000_000.0)
    recent = history(store, 1, start=2_000_000.0, name="weekly")
    queued, _ = store.create(spec(77), now=1_000_000.0)  # old, but not finished
    assert [j.job_id for j in store.prune(500_000.0, dry_run=True, now=2_100_000.0)] == old
    assert len(store.list()) == 5
    assert [j.job_id for j in store.prune(500_000.0, now=2_100_000.0)] == old
    assert {j.job_id for j in store.list()} == {*recent, queued.job_id}
    assert {j.job_id for j in store.list({JobState.SUCCEEDED})} == set(recent)
    assert sorted(os.listdir(output)) == ["part-00000.parquet"]
    again, created = store.create(spec(0, idempotency_key="nightly-0", output="/out/again"))
    # its key went too:
    assert created and again.job_id not in old


def test_prune_removes_index_entries_a_dead_writer_left(tmp_path):
    store = JobStore.from_uri(str(tmp_path / "store"))
    job, _ = store.create(spec(1))
    store._index(job.job_id, JobState.RUNNING)  # written before a record change that never came
    assert store.list({JobState.RUNNING}) == []  # a reader skips it
    store.prune(86400.0)
    assert store.ids_in({JobState.RUNNING}) == [] and store.ids_in({JobState.QUEUED}) == [job.job_id]


def test_a_store_from_before_the_index_is_indexed_by_its_first_reader(tmp_path):
    store = JobStore.from_uri(str(tmp_path / "store"))
    ids = history(store, 2)
    queued, _ = store.create(spec(9))
    storage.delete(storage.join(store.root, "state.json"))
    for state in JobState:
        for job_id in store.ids_in({state}):
            store._unindex(job_id, state)
    reader = JobStore.from_uri(store.root)
    assert [j.job_id for j in reader.list({JobState.SUCCEEDED})] == ids
    assert [j.job_id for j in reader.list({JobState.QUEUED})] == [queued.job_id]
