"""Everything that talks to Ray itself, apart from the job's own actors and tasks.

- Connecting: ``ensure_ray`` (a driver joins a cluster or starts a local Ray), ``jobs_client``
  (a Ray Jobs API client, with the cluster's auth token), ``session_dir``.
- The embedded default's local head, started with ``ray start --head``: a real one-node
  cluster with the dashboard and its Jobs API, so jobs launched on it show on the dashboard's
  Jobs page exactly as on a deployed cluster. Its processes are found again by their private
  temp folder, so stopping it never touches another Ray instance. One store has at most one
  such head: the dispatcher holding the store's lease records it (``local-head.json``); a
  dispatcher that takes the store over after a crash adopts that head if it still answers
  (its running jobs go on) or stops what is left of it.
- Ray's private APIs, each behind one function (``free_resources_per_node``,
  ``running_serve_address``, ``session_dir``), so a Ray upgrade is checked in one place.
- ``root_cause``: the original error inside the exceptions Ray wraps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    client_port: int = 0  # the Ray Client server's port: the one process without the folder
    metrics_port: int = 0  # where this node's Prometheus metrics are served (/metrics)

    def processes(self) -> list[Any]:
        """This head's processes (GCS, raylet, dashboard, workers) and all they started.

        Found by the temp folder in their command line, or (the Ray Client server) by its
        port; agents and workers rename themselves, so they are found as children.
        """
        import psutil

        port = f"--port={self.client_port}"
        found: dict[int, Any] = {}
        for process in psutil.process_iter(["cmdline"]):
            try:
                args = process.info["cmdline"] or []
                mine = any(self.temp_dir in part for part in args) or (
                    self.client_port and port in args and any("ray" in a for a in args)
                )
                if mine and process.pid != os.getpid():
                    found[process.pid] = process
                    found.update({c.pid: c for c in process.children(recursive=True)})
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def auth_mode(self) -> str | None:
        """The ``RAY_AUTH_MODE`` this head runs with (``token`` when ``ray start`` found a
        token), which a driver joining it must use too; None if it cannot be read."""
        import psutil

        for process in self.processes():
            try:
                if "gcs_server" in process.name():
                    return process.environ().get("RAY_AUTH_MODE")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return None

    def stop(self) -> None:
        """Kill this head's processes and remove its folder."""
        import psutil

        processes = self.processes()
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                process.kill()
        psutil.wait_procs(processes, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def answers(self, tries: int = 3) -> bool:
        """True when its Jobs API responds (the head is alive and usable); patient, since a
        busy machine can be slow to answer and a wrong "no" would stop a working head."""
        import time
        import urllib.error
        import urllib.request

        for attempt in range(tries):
            try:
                with urllib.request.urlopen(f"{self.jobs_address}/api/version", timeout=5) as reply:
                    return bool(reply.status == 200)
            except urllib.error.HTTPError as refused:  # 401: token auth is on; it answered
                return refused.code in (401, 403)
            except OSError:
                if attempt + 1 < tries:
                    time.sleep(2)
        return False

    def token_hint(self) -> str:
        """Where the dashboard's login token is (Ray 2.60 asks for it), without showing it."""
        return token_hint()

    def to_dict(self) -> dict[str, Any]:
        return {"jobs_address": self.jobs_address, "gcs_address": self.gcs_address,
                "temp_dir": self.temp_dir, "client_port": self.client_port,
                "metrics_port": self.metrics_port, "host": socket.gethostname()}


def token_hint() -> str:
    """Where Ray's auth token comes from here: ``RAY_AUTH_TOKEN`` or Ray's token file."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    path = os.path.expanduser("~/.ray/auth_token")
    if os.path.exists(path):
        return f"paste the contents of {path}"
    return "none required"


def recorded_head(store: Any) -> LocalHead | None:
    """The local head the store's embedded dispatcher recorded, if it is on this machine."""
    record = store.local_head()
    if not record or record.get("host") != socket.gethostname():
        return None
    return LocalHead(record["jobs_address"], record["gcs_address"], record["temp_dir"],
                     int(record.get("client_port", 0)), int(record.get("metrics_port", 0)))


def running_head(store: Any) -> LocalHead | None:
    """The store's local head when its processes run (``submit --wait`` joins it), else None."""
    head = recorded_head(store)
    return head if head is not None and head.processes() else None


def adopt_or_start(store: Any) -> LocalHead:
    """The store's local head: the recorded one if it still answers, else a new one.

    A recorded head that no longer answers (a crashed dispatcher's half-dead head) is stopped
    first, so no orphaned Ray processes are left beside the new head.
    """
    old = recorded_head(store)
    if old is not None:
        if old.processes() and old.answers():
            return old
        old.stop()
    return start_head(on_start=lambda head: store.remember_local_head(head.to_dict()))


def start_head(
    num_cpus: int | None = None, on_start: Callable[[LocalHead], None] | None = None
) -> LocalHead:
    """Start a one-node Ray cluster on free ports; returns how to reach and stop it.

    ``on_start`` gets the head before ``ray start`` runs, so a caller killed while the head
    comes up has already recorded where to find (and stop) its processes.
    """
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="bi-ray-", dir="/tmp")
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    command = [
        ray, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
        "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ]
    # Every port free, not Ray's defaults: a second Ray on this machine (a developer's, a
    # test's) would otherwise hold the agent port, and the Jobs API would find no agent.
    client_port, metrics_port = free_port(), free_port()
    command += [f"--ray-client-server-port={client_port}", f"--metrics-export-port={metrics_port}"]
    for option in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port",
    ):
        command.append(f"--{option}={free_port()}")
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    head = LocalHead(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", temp_dir, client_port,
                     metrics_port)
    if on_start is not None:
        on_start(head)
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        head.stop()
        raise BatchinfError(f"ray start failed: {done.stderr.strip().splitlines()[-1:]}")
    _wait_for_jobs_api(head)
    return head


def _wait_for_jobs_api(head: LocalHead, timeout_s: float = 90.0) -> None:
    """The Jobs API answers before its node agent takes jobs: wait until a no-op job runs."""
    import time


    client = jobs_client(head.jobs_address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.submit_job(entrypoint="true", submission_id=f"batchinf-warmup-{free_port()}")
            _forget_probes(client)
            return
        except RuntimeError as exc:
            if time.monotonic() > deadline:
                head.stop()
                raise BatchinfError(f"the local Ray head never took jobs: {exc}") from exc
            time.sleep(0.5)


def _forget_probes(client: Any, timeout_s: float = 120.0) -> None:
    """Delete the no-op probe jobs once they end, so the Jobs page lists only real jobs.

    All of them: a probe the Jobs API refused while its agent was starting can still be
    listed. On a busy machine a probe's driver can take a while to end.
    """
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            probes = [j for j in client.list_jobs()
                      if (j.submission_id or "").startswith("batchinf-warmup-")]
            for job in probes:
                if str(job.status) in ("SUCCEEDED", "FAILED", "STOPPED"):
                    client.delete_job(job.submission_id)
            if probes and all(str(j.status) in ("SUCCEEDED", "FAILED", "STOPPED") for j in probes):
                return
        time.sleep(0.5)


def process_is_gone(host: str, pid: int) -> bool:
    """True when ``pid`` on ``host`` is known to have ended: only decidable on this host.

    A killed process whose parent is gone may linger as a zombie where nothing reaps it;
    that counts as ended.
    """
    import psutil

    if host != socket.gethostname() or pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


# --- Connecting to Ray: a driver here, or a Jobs API client ---------------------------------

_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def jobs_client(address: str) -> Any:
    """A Ray Jobs API client for ``address`` (``http://head:8265``), errors translated.

    Ray 2.60 clusters may require their auth token. It is sent as a header read from where
    Ray keeps it (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), which
    works whenever Ray was first imported, unlike ``RAY_AUTH_MODE`` (read once, at import).
    """
    token = ray_auth_token()
    if token:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    # Ray lets RAY_API_SERVER_ADDRESS or RAY_ADDRESS override the address it is given: the
    # address asked for here is the one used (the client keeps it once made).
    hidden = {k: os.environ.pop(k) for k in _ADDRESS_VARIABLES if k in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:
        raise BatchinfError(f"cannot reach the Ray Jobs API at {address}: {exc}") from exc
    finally:
        os.environ.update(hidden)


def ray_auth_token() -> str | None:
    """The Ray auth token this machine is set up with, if any (never logged or stored)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), os.path.expanduser("~/.ray/auth_token")):
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
    return None


def ensure_ray(address: str | None = None, *, dashboard: bool | None = None) -> str | None:
    """Connect to the cluster at ``address``, or start a local Ray instance (embedded default).

    ``dashboard=False`` starts a local instance without the dashboard, for a run that ends
    with this process: Ray starts about 2 s sooner (docs/performance.md).
    Returns the dashboard's URL (its Jobs API) when this call started or joined Ray.
    """
    import ray

    if ray.is_initialized():
        return None
    held = _NoticeHolder()
    try:
        with held:
            context = ray.init(
                address=address,
                log_to_driver=False,
                configure_logging=False,
                include_dashboard=dashboard,
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BatchinfError(f"cannot start or reach Ray ({address or 'RAY_ADDRESS'}): {exc}") from exc
    held.write_to_session_log()
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and "://" not in url else url


class _NoticeHolder(logging.Handler):
    """Ray's notices while it starts (its token-auth banner) kept from the user's terminal,
    where only batchinf's own lines go, and written to ``batchinf-driver.log`` in the Ray
    session's log folder instead."""

    LOGGERS = ("ray._private.authentication.authentication_token_setup",)

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def __enter__(self) -> _NoticeHolder:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(self)
            logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            logger.propagate = True

    def write_to_session_log(self) -> None:
        folder = session_dir()
        if not self.lines or folder is None:
            return
        with contextlib.suppress(OSError), open(
            os.path.join(folder, "logs", "batchinf-driver.log"), "a", encoding="utf-8"
        ) as log:
            log.write("\n".join(self.lines) + "\n")


def session_dir() -> str | None:
    """The Ray session folder of the instance this process started or joined (None if none)."""
    from ray._private import worker  # the session folder has no public accessor

    node = getattr(worker, "_global_node", None)
    return node.get_session_dir_path() if node is not None else None


# --- Ray's private APIs, each behind one function here ---------------------------------------


def free_resources_per_node() -> dict[str, dict[str, float]]:
    """Each live node's free resources by node id (Ray has no public accessor for these)."""
    from ray._private.state import available_resources_per_node

    return available_resources_per_node()


def running_serve_address() -> tuple[str, int] | None:
    """Where the Ray Serve already running on the joined cluster listens, if one runs."""
    from ray.serve.context import _get_global_client

    running = _get_global_client(raise_if_no_controller_running=False)
    if running is None:
        return None
    http = running.http_config
    return http.host, http.port


def root_cause(exc: BaseException) -> str:
    """The last line of the original error that Ray wrapped, e.g. ``ModelError: ...``."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error:" in line or "Exception:" in line:
            return line.split("batchinf.errors.", 1)[-1]
    return lines[-1] if lines else type(exc).__name__
