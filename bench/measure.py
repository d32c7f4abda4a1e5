"""Run one pipeline command in its own process session and measure it from the outside.

Wall time, CPU seconds of the whole process tree, peak memory of the tree (sum of RSS sampled
every ``interval``; sum of PSS, which counts shared pages once, sampled less often because it
reads ``smaps``), the CPU that *other* processes on the machine used meanwhile, and a timeout
plus an idle detector that kill the tree instead of blocking on a hung pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

MB = 1024 * 1024
IDLE_CORES = 0.35  # an idle local Ray (raylet, GCS, dashboard, agents) uses 0.1-0.25


@dataclass
class Measurement:
    """What one subprocess run produced; ``result`` is the pipeline's own JSON line."""

    status: str  # ok | timeout | hung | failed (rc=N)
    returncode: int | None
    wall_seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    peak_pss_mb: float | None
    other_cores: float
    leftover_processes: int
    result: dict[str, Any] | None
    log: str
    argv: list[str] = field(default_factory=list)
    driver_peak_rss_mb: float = 0.0  # the root process alone (for batchinf: the job driver)
    steal_cores: float = 0.0  # CPU the hypervisor gave to other machines meanwhile (noise)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TreeSampler(threading.Thread):
    """Samples a process and all its descendants (RSS sum, PSS sum, CPU seconds per process)."""

    def __init__(self, root_pid: int, interval: float = 0.2, pss_every: int = 10) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(root_pid)
        self.interval, self.pss_every = interval, pss_every
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        self.cpu: dict[tuple[int, float], float] = {}
        self.peak_rss = 0
        self.peak_root_rss = 0
        self.peak_pss: int | None = None
        self.history: deque[tuple[float, float]] = deque()  # (monotonic s, CPU s)
        self._stop_event = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self._stop_event.is_set():
            self.sample(with_pss=tick % self.pss_every == 0)
            tick += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self, with_pss: bool = False) -> None:
        rss = pss = 0
        for proc in self._tree():
            try:
                key = (proc.pid, proc.create_time())
                with proc.oneshot():
                    times = proc.cpu_times()
                    proc_rss = proc.memory_info().rss
                    rss += proc_rss
                    pss += proc.memory_full_info().pss if with_pss else 0
            except psutil.Error:
                continue  # exited between listing and reading
            self.seen[key] = proc
            if proc.pid == self.root.pid:
                self.peak_root_rss = max(self.peak_root_rss, proc_rss)
            self.cpu[key] = times.user + times.system
        self.peak_rss = max(self.peak_rss, rss)
        if with_pss and pss:
            self.peak_pss = max(self.peak_pss or 0, pss)
        self.history.append((time.monotonic(), self.cpu_seconds()))

    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())

    def idle_for(self, window: float, max_cores: float, slice_s: float = 10.0) -> bool:
        """True when every ``slice_s`` slice of the last ``window`` s stayed under ``max_cores``.

        Slices, not one average, so that a busy start (imports, model load) followed by a
        deadlock is caught ``window`` s after the last busy slice, and a pipeline that works in
        bursts is never mistaken for a hung one.
        """
        if window <= 0 or not self.history or self.history[-1][0] - self.history[0][0] < window:
            return False
        now = self.history[-1][0]
        last: tuple[float, float] | None = None
        for t, cpu in self.history:
            if now - t > window:
                continue
            if last is None or t - last[0] >= slice_s:
                if last is not None and (cpu - last[1]) / (t - last[0]) >= max_cores:
                    return False
                last = (t, cpu)
        return True

    def alive(self) -> list[psutil.Process]:
        return [p for p in self.seen.values() if p.is_running()]  # is_running checks create_time


def _kill_tree(proc: subprocess.Popen[bytes], sampler: TreeSampler, grace: float) -> int:
    """SIGKILL the session we started and every process of the tree we saw.

    Returns how many descendants were still alive ``grace`` seconds after the root ended
    (Ray's helpers take a moment to exit after ``ray.shutdown()``).
    """
    _, leftovers = psutil.wait_procs([p for p in sampler.alive() if p.pid != proc.pid], grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session=True: pgid == pid
    for p in [*leftovers, *sampler.alive()]:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return len(leftovers)


def _wait(proc: subprocess.Popen[bytes], sampler: TreeSampler, timeout: float, idle: float) -> str:
    start = time.monotonic()
    while True:
        try:
            rc = proc.wait(timeout=1.0)
            return "ok" if rc == 0 else f"failed (rc={rc})"
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() - start > timeout:
            return "timeout"
        if sampler.idle_for(idle, max_cores=IDLE_CORES):
            return "hung"


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict) and "pipeline" in value:
                return value
    return None


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0)


def _rusage_cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_measured(
    argv: list[str],
    env: dict[str, str],
    log_path: Path,
    timeout: float = 300.0,
    idle_timeout: float = 60.0,
    cwd: str | None = None,
) -> Measurement:
    """Run ``argv`` to completion (or kill it) and measure it; stderr goes to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out_path = log_path.with_suffix(".stdout")
    busy0, self0 = _busy_seconds(), _rusage_cpu(resource.RUSAGE_SELF)
    steal0 = getattr(psutil.cpu_times(), "steal", 0.0)
    children0, t0 = _rusage_cpu(resource.RUSAGE_CHILDREN), time.monotonic()
    with log_path.open("wb") as err, out_path.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True
        )
        sampler = TreeSampler(proc.pid)
        sampler.start()
        status = _wait(proc, sampler, timeout, idle_timeout)
        wall = time.monotonic() - t0
        sampler.stop()
        leftovers = _kill_tree(proc, sampler, grace=3.0 if status == "ok" else 0.0)
    # Reaped descendants are in RUSAGE_CHILDREN; orphans only in the samples: take the larger.
    cpu = max(_rusage_cpu(resource.RUSAGE_CHILDREN) - children0, sampler.cpu_seconds())
    others = _busy_seconds() - busy0 - cpu - (_rusage_cpu(resource.RUSAGE_SELF) - self0)
    return Measurement(
        status=status,
        returncode=proc.returncode,
        wall_seconds=round(wall, 3),
        cpu_seconds=round(cpu, 3),
        peak_rss_mb=round(sampler.peak_rss / MB, 1),
        peak_pss_mb=round(sampler.peak_pss / MB, 1) if sampler.peak_pss else None,
        other_cores=round(max(others, 0.0) / wall, 2),
        leftover_processes=leftovers if status == "ok" else 0,
        result=_last_json(out_path.read_text(errors="replace")) if status == "ok" else None,
        log=str(log_path),
        argv=argv,
        driver_peak_rss_mb=round(sampler.peak_root_rss / MB, 1),
        steal_cores=round((getattr(psutil.cpu_times(), "steal", 0.0) - steal0) / wall, 2),
    )
