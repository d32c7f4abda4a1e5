"""``batchinf serve`` run for real: the CLI in its own process, answering HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from tests.conftest import free_port


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path
    tree: list[psutil.Process] = field(default_factory=list)  # what it started, once ready

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, how: signal.Signals = signal.SIGTERM, timeout: float = 60) -> tuple[int, float]:
        """Send ``how``; the exit code and the seconds it took to exit."""
        started = time.monotonic()
        self.process.send_signal(how)
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        return code, time.monotonic() - started

    def left_behind(self, timeout: float = 20) -> list[psutil.Process]:
        """Processes it started that still run (zombies nobody reaps count as gone)."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [p for p in self.tree if _running(p)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# Ray waits a fixed 30 s for its raylet to register; a loaded machine can miss that.
RAY_START_TIMED_OUT = "The current node timed out during startup"


def start_server(model: str, *args: str, folder: Path, env: dict[str, str] | None = None,
                 base_env: dict[str, str] | None = None, timeout: float = 240,
                 attempts: int = 2) -> Server:
    """Start ``batchinf serve`` and wait until /healthz answers 200 (or fail with its output).

    Its environment is ``base_env`` (default: this process's) with ``env`` on top. A start that
    failed only because Ray's own start timed out is tried again, up to ``attempts`` in all.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _start_server(model, *args, folder=folder, env=env, base_env=base_env,
                                 timeout=timeout)
        except AssertionError as failed:
            if attempt == attempts or RAY_START_TIMED_OUT not in str(failed):
                raise
    raise AssertionError("not reached")


def _start_server(model: str, *args: str, folder: Path, env: dict[str, str] | None,
                  base_env: dict[str, str] | None, timeout: float) -> Server:
    port = free_port()
    log = folder / f"serve-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "batchinf.cli", "serve", "--model", model, "--port", str(port),
             *args],
            stdout=out, stderr=subprocess.STDOUT,
            env={**(os.environ if base_env is None else base_env), **(env or {})},
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"batchinf serve exited {process.returncode}:\n{server.output()}")
        try:
            if requests.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                server.tree = psutil.Process(process.pid).children(recursive=True)
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"batchinf serve not ready in {timeout} s:\n{server.output()}")
