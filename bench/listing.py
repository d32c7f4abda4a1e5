"""A listing as a manifest: time to the first committed part, driver memory, listing rate.

``python -m bench.listing --objects 1000,100000 --out bench/results [--no-rate]``

For each size it fills ``s3://listing-N/photos/`` on moto's server (in this process, reached
over HTTP by everything else; the objects are put straight into moto's store, which is fast,
and each is the same real 8x8 PNG) and measures:

- the listing alone, in this process: ``storage.list_pages`` over the whole prefix (objects/s),
  then the job's listing with its frozen shards written (objects/s), then that again under
  ``tracemalloc`` for its peak Python memory (which includes moto's own, serving the pages);
- ``batchinf submit s3://listing-N/photos/ --wait`` with the ``tiny`` model in a subprocess:
  seconds from its start to the first committed part, and the job driver's peak RSS. The
  1,000-object job runs to its end; a larger one is cancelled once its first part is
  committed (``--cancel-above``), since the question is the start, not 100,000 images
  through moto.

It prints one JSON line per size and writes ``<out>/listing-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench import report
from bench.measure import MB, TreeSampler
from bench.run import PROJECT_ROOT, _child_env, _make_model
from bench.s3 import CREDENTIALS, _free_port

ACCOUNT = "123456789012"  # moto's default account


def tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def start_moto() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS})
    return server, endpoint


def fill(bucket: str, count: int) -> float:
    """``count`` objects under ``photos/``, put straight into moto's store; seconds taken."""
    from moto.s3.models import s3_backends

    from batchinf.storage import s3_client

    s3_client().create_bucket(Bucket=bucket)
    backend = s3_backends[ACCOUNT]["global"]
    body = tiny_png()
    started = time.monotonic()
    for i in range(count):
        backend.put_object(bucket, f"photos/{i // 1000:04d}/{i:07d}.png", body)
    return time.monotonic() - started


def listing_rate(prefix: str, work: Path) -> dict[str, Any]:
    """The prefix listed page by page, then as a job lists it (shards frozen under ``work``)."""
    import pyarrow.parquet  # noqa: F401  (imported before the clock starts, as in a job)

    from batchinf import storage
    from batchinf.listing import ListingRows

    started = time.monotonic()
    listed = sum(len(page) for page in storage.list_pages(prefix))
    pages_s = time.monotonic() - started
    started = time.monotonic()
    rows = ListingRows(prefix, output=str(work / "timed"), job_id="bench-listing")
    frozen = sum(len(shard) for shard in rows.shards(1024))
    frozen_s = time.monotonic() - started
    tracemalloc.start()  # a second pass, traced: tracing slows Python several times over
    rows = ListingRows(prefix, output=str(work / "traced"), job_id="bench-listing")
    assert sum(len(shard) for shard in rows.shards(1024)) == frozen
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "objects": listed,
        "list_objects_per_s": round(listed / pages_s),
        "list_and_freeze_objects_per_s": round(frozen / frozen_s),
        "listing_peak_traced_mb": round(peak / MB, 1),
    }


def run_job(prefix: str, model: str, work: Path, cancel: bool, timeout: float) -> dict[str, Any]:
    """``batchinf submit --wait`` on the prefix; seconds to the first part, driver peak RSS."""
    from batchinf.jobstore import JobStore

    output, store = work / "out", work / "store"
    argv = [str(Path(sys.executable).with_name("batchinf")), "submit", prefix, "--model", model,
            "--output", str(output), "--store", str(store), "--shard-size", "256",
            "--batch-size", "64", "--wait", "--json"]
    env = {k: v for k, v in _child_env({}).items() if k != "RAY_ADDRESS"}
    log = (work / "submit.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env,
                            cwd=str(PROJECT_ROOT), start_new_session=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    first_part = None
    while proc.poll() is None and time.monotonic() - started < timeout:
        if first_part is None and (output / "part-00000.parquet").exists():
            first_part = time.monotonic() - started
            if cancel:
                jobs = JobStore.from_uri(str(store))
                jobs.request_cancel(jobs.list()[0].job_id)
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    stdout = proc.communicate()[0].decode(errors="replace")
    wall = time.monotonic() - started
    sampler.stop()
    frozen = output / "_listing"
    return {
        "status": "ok" if proc.returncode == 0 else f"rc={proc.returncode}",
        "first_part_s": round(first_part, 2) if first_part is not None else None,
        "driver_peak_rss_mb": round(sampler.peak_root_rss / MB, 1),
        "tree_peak_rss_mb": round(sampler.peak_rss / MB, 1),
        "wall_s": round(wall, 1),
        "cancelled_after_first_part": cancel,
        "listing_parts_frozen": len(list(frozen.glob("part-*.parquet"))),
        "listing_complete": (frozen / "_COMPLETE").exists(),
        "result": _last_json(stdout),
    }


def _last_json(text: str) -> dict[str, Any] | None:
    """The command's ``--json`` result (one document, possibly over several lines)."""
    for line in [text, *reversed(text.strip().splitlines())]:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.listing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", default="1000,100000", help="comma list of prefix sizes")
    p.add_argument("--cancel-above", type=int, default=1000,
                   help="cancel jobs on prefixes larger than this after their first part")
    p.add_argument("--no-rate", action="store_true",
                   help="skip the listing-rate passes (minutes at 100,000 objects on moto)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--cache", default=None, help="model cache (default <out>/cache)")
    p.add_argument("--timeout", type=float, default=1800.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import shutil

    args = parse_args(argv)
    out = Path(args.out).resolve()
    cache = Path(args.cache or out / "cache").resolve()
    model = _make_model("tiny", cache / "models")
    server, endpoint = start_moto()
    started = time.strftime("%Y%m%d-%H%M%S")
    results = []
    try:
        for count in (int(n) for n in args.objects.split(",")):
            work = out / "work" / "listing" / str(count)
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            bucket = f"listing-{count}"
            row: dict[str, Any] = {"objects": count, "fill_s": round(fill(bucket, count), 1)}
            if not args.no_rate:
                row |= listing_rate(f"s3://{bucket}/photos/", work / "frozen")
            row |= run_job(f"s3://{bucket}/photos/", model, work, count > args.cancel_above,
                           args.timeout)
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
    record = {"started": started, "args": vars(args), "endpoint": endpoint, "results": results}
    report.write_json(out / f"listing-{started}.json", record)
    print(f"wrote {out / f'listing-{started}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
