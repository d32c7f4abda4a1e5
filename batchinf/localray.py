"""A local Ray head started with ``ray start --head``: the embedded dispatcher's cluster.

It is a real one-node cluster with the dashboard and its Jobs API, so jobs launched on it show
on the dashboard's Jobs page exactly as on a deployed cluster. Its processes are found again
by their private temp folder, so stopping it never touches another Ray instance.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from batchinf.errors import BatchinfError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class LocalHead:
    jobs_address: str  # http://127.0.0.1:<dashboard port>
    gcs_address: str  # 127.0.0.1:<port>, for ray.init(address=...)
    temp_dir: str

    def stop(self) -> None:
        """Kill this head's processes (found by their temp folder) and remove the folder."""
        import psutil

        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in part for part in process.info["cmdline"] or []):
                    process.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(num_cpus: int | None = None) -> LocalHead:
    """Start a one-node Ray cluster on free ports; returns how to reach and stop it."""
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="bi-ray-", dir="/tmp")
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    command = [
        ray, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
        "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ]
    # Every port free, not Ray's defaults: a second Ray on this machine (a developer's, a
    # test's) would otherwise hold the agent port, and the Jobs API would find no agent.
    for option in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port",
        "object-manager-port",
    ):
        command.append(f"--{option}={free_port()}")
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    head = LocalHead(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", temp_dir)
    if done.returncode != 0:
        head.stop()
        raise BatchinfError(f"ray start failed: {done.stderr.strip().splitlines()[-1:]}")
    _wait_for_jobs_api(head)
    return head


def _wait_for_jobs_api(head: LocalHead, timeout_s: float = 90.0) -> None:
    """The Jobs API answers before its node agent takes jobs: wait until a no-op job runs."""
    import time

    from batchinf.dispatcher import jobs_client

    client = jobs_client(head.jobs_address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.submit_job(entrypoint="true", submission_id=f"batchinf-warmup-{free_port()}")
            return
        except RuntimeError as exc:
            if time.monotonic() > deadline:
                head.stop()
                raise BatchinfError(f"the local Ray head never took jobs: {exc}") from exc
            time.sleep(0.5)
