"""What the job store costs in requests as its history grows: an idle dispatcher, a submit, a
``list --state``, with N finished jobs in an ``s3://`` store.

    python -m bench.storecost --finished 20,1000 [--idle-s 60] [--code DIR]

Every store request goes through a fault-free counting proxy (``bench.faultproxy``) in front of
moto's server on 127.0.0.1, the way an object store bills them. The dispatcher, ``submit`` and
``list`` are the real commands, run as their own processes against a real local Ray head; only
the finished jobs are written straight into the store (records and index entries, as the store
writes them). ``--code DIR`` runs the commands from another checkout of batchinf (its
``PYTHONPATH``), to measure the code before a change beside the code after it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.faultproxy import FaultProxy

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request

RESULTS = Path(__file__).parent / "results"


def _populate(root: str, finished: int) -> None:
    """``finished`` SUCCEEDED jobs, one a night, as the store would have written them."""
    from batchinf import storage
    from batchinf.job import Job, JobSpec, JobState, transition
    from batchinf.jobstore import _encode

    start = time.time() - 86400 * (finished + 1)

    def write(n: int) -> None:
        spec = JobSpec("s3://in/m.csv", "s3://models/m", f"s3://out/night-{n}",
                       idempotency_key=f"nightly-{n}")
        job = transition(Job.new(spec, now=start + 86400 * n), JobState.RUNNING)
        job = transition(job, JobState.SUCCEEDED, now=start + 86400 * n + 3600)
        storage.write_bytes(storage.join(root, "jobs", f"{job.job_id}.json"), _encode(job.to_dict()))
        storage.write_bytes(storage.join(root, "state", "SUCCEEDED", job.job_id), b"")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(finished)))
    storage.write_bytes(storage.join(root, "state.json"), _encode({"version": 1}))


def _command_env(proxy: FaultProxy, code: str | None) -> dict[str, str]:
    env = dict(os.environ, AWS_ENDPOINT_URL=proxy.endpoint)
    if code:
        env["PYTHONPATH"] = os.path.abspath(code)
    return env


def _counted(proxy: FaultProxy, argv: list[str], env: dict[str, str], cwd: str) -> dict[str, Any]:
    before, started = proxy.counts["requests"], time.monotonic()
    done = subprocess.run([sys.executable, "-m", "batchinf.cli", *argv], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    if done.returncode not in (0,):
        raise RuntimeError(f"batchinf {argv[0]} exited {done.returncode}: {done.stderr[-500:]}")
    return {"requests": proxy.counts["requests"] - before,
            "seconds": round(time.monotonic() - started, 2)}


def _idle_dispatcher(proxy: FaultProxy, root: str, address: str, env: dict[str, str],
                     idle_s: float, cwd: str) -> dict[str, Any]:
    """Requests an idle dispatcher makes per minute, after a warm-up of 20 s."""
    log = open(os.path.join(cwd, "dispatcher.log"), "ab")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [sys.executable, "-m", "batchinf.cli", "dispatcher", "--address", address, "--store", root],
        env=env, cwd=cwd, stdout=log, stderr=log,
    )
    try:
        time.sleep(20)
        before = proxy.counts["requests"]
        time.sleep(idle_s)
        made = proxy.counts["requests"] - before
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()
    return {"requests_per_min": round(made * 60 / idle_s, 1)}


def measure(finished: int, *, idle_s: float, code: str | None, head: Any, endpoint: str,
            work: str) -> dict[str, Any]:
    from batchinf import storage

    bucket = f"cost-{finished}-{int(time.time())}"
    storage.s3_client().create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/store"
    _populate(root, finished)
    with FaultProxy(endpoint) as proxy:
        env = _command_env(proxy, code)
        idle = _idle_dispatcher(proxy, root, head.jobs_address, env, idle_s, work)
        submit = _counted(proxy, ["submit", "m.csv", "--model", "model", "--output",
                                  f"s3://{bucket}/out", "--store", root, "--address",
                                  head.jobs_address, "--json"], env, work)
        listed = _counted(proxy, ["list", "--state", "RUNNING", "--store", root, "--json"], env, work)
    return {"finished_jobs": finished, "idle_dispatcher": idle, "submit": submit,
            "list_state_running": listed}


def _inputs(work: str) -> None:
    """A manifest and a model folder that pass submit's checks (nothing runs them)."""
    from tests.models import make_image_model

    Path(work, "m.csv").write_text("uri\na.png\n")
    make_image_model(os.path.join(work, "model"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--finished", default="20,1000", help="finished jobs, comma-separated")
    parser.add_argument("--idle-s", type=float, default=60.0, help="idle dispatcher window")
    parser.add_argument("--code", help="run the commands from this batchinf checkout")
    args = parser.parse_args(argv)

    from moto.server import ThreadedMotoServer

    from batchinf.raycluster import free_port, start_head

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    head = start_head(num_cpus=1)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="storecost-") as work:
            _inputs(work)
            for finished in (int(n) for n in args.finished.split(",")):
                rows.append(measure(finished, idle_s=args.idle_s, code=args.code, head=head,
                                    endpoint=endpoint, work=work))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        head.stop()
        server.stop()
    record = {"code": os.path.abspath(args.code) if args.code else "this checkout",
              "idle_s": args.idle_s, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"storecost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"{'finished':>9} {'idle req/min':>13} {'submit req':>11} {'submit s':>9} "
          f"{'list --state req':>17} {'list s':>7}")
    for r in rows:
        print(f"{r['finished_jobs']:>9} {r['idle_dispatcher']['requests_per_min']:>13} "
              f"{r['submit']['requests']:>11} {r['submit']['seconds']:>9} "
              f"{r['list_state_running']['requests']:>17} {r['list_state_running']['seconds']:>7}")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
