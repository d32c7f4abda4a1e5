"""Metrics as Prometheus scrapes them: the Ray node's metrics endpoint after a real job, and
the dispatcher's queue depth."""

from __future__ import annotations

import re
import time
import urllib.request
from typing import Any

from batchinf.dispatcher import Dispatcher
from batchinf.job import JobSpec
from batchinf.jobstore import JobStore
from batchinf.pipeline import run_job
from batchinf.raycluster import free_port


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The summed value of ``name`` over series whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} ([0-9.e+-]+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total, found = total + float(match.group(2)), True
    return total if found else None


def test_a_jobs_counts_reach_the_ray_metrics_endpoint(
    ray_local: Any, ray_head: Any, image_model: str, colour_images: Any, tmp_path: Any
) -> None:
    manifest, colours = colour_images
    with open(manifest, "a", encoding="utf-8") as f:
        f.write("img/missing-1.png,998,x\nimg/missing-2.png,999,y\n")
    summary = run_job("job-metrics", JobSpec(manifest, image_model, str(tmp_path / "out"))).summary
    assert (summary["rows_total"], summary["errors_by_kind"]) == (14, {"not_found": 2})

    url = f"http://127.0.0.1:{ray_head.metrics_port}/metrics"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Ray reports process metrics every few seconds
        text = scrape(url)
        if sample(text, "ray_batchinf_images_processed_total", job_id="job-metrics") == 14:
            break
        time.sleep(2)
    assert sample(text, "ray_batchinf_images_processed_total", job_id="job-metrics") == 14
    assert sample(text, "ray_batchinf_rows_failed_total", job_id="job-metrics",
                  error_kind="not_found") == 2
    assert (sample(text, "ray_batchinf_batch_latency_seconds_count") or 0) >= 1
    assert sample(text, "ray_batchinf_replica_busy_ratio", job_id="job-metrics") is not None


def test_the_dispatcher_serves_queue_depth_by_state(ray_head: Any, tmp_path: Any) -> None:
    store = JobStore.from_uri(str(tmp_path / "store"))
    for name in ("a", "b"):
        job, _ = store.create(JobSpec("m.csv", "model", str(tmp_path / name)))
        store.request_cancel(job.job_id)
    port = free_port()
    Dispatcher(store, ray_head.jobs_address, metrics_port=port).tick()
    text = scrape(f"http://127.0.0.1:{port}/metrics")
    assert sample(text, "batchinf_jobs", state="CANCELLED") == 2
    assert sample(text, "batchinf_jobs", state="QUEUED") == 0


def test_the_grafana_dashboard_charts_every_metric_and_only_those() -> None:
    import json
    import os

    from batchinf import metrics

    path = os.path.join(os.path.dirname(__file__), "..", "deploy", "grafana", "batchinf.json")
    with open(path, encoding="utf-8") as f:
        exprs = " ".join(t["expr"] for p in json.load(f)["panels"] for t in p["targets"])
    charted = set(re.findall(r"\b(?:ray_)?(batchinf_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\b", exprs))
    declared = set(re.findall(r'^    (batchinf_[a-z_]+) ', metrics.__doc__ or "", re.M))
    assert charted == declared and len(declared) == 8


def test_replica_busy_share_is_exported_while_the_job_runs(
    ray_local: Any, ray_head: Any, image_model: str, colour_images: Any, tmp_path: Any
) -> None:
    """Seen on the metrics endpoint before the job ends (then cancelled: no need to finish)."""
    import threading

    from tests.conftest import repeated_manifest

    manifest = repeated_manifest(colour_images[0], 2000, tmp_path / "long.csv")
    seen = threading.Event()
    job = threading.Thread(target=run_job, args=(
        "job-busy", JobSpec(manifest, image_model, str(tmp_path / "out"), batch_size=1)),
        kwargs={"should_stop": seen.is_set})
    job.start()
    url = f"http://127.0.0.1:{ray_head.metrics_port}/metrics"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.is_alive() and not seen.is_set():
        if sample(scrape(url), "ray_batchinf_replica_busy_ratio", job_id="job-busy") is not None:
            seen.set()
        time.sleep(2)
    job.join(timeout=120)
    assert seen.is_set(), "no busy share exported while the job ran"
