"""Showing a job's progress in the terminal: the CLI's side of the progress callback.

On a terminal: a tqdm bar (done/total, images/s, ETA, failed rows). Anywhere else (cron,
a pipe, CI): one plain log line every ``progress_every`` seconds (a setting, default 10).
Both go to stderr, so stdout keeps only the result (and ``--json`` stays parseable).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from batchinf.progress import Progress
from batchinf.settings import Settings


def _format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def log_line(job_id: str, progress: Progress | Snapshot) -> str:
    """One line a cron log can keep: time, counts, percentage, speed, ETA, failures."""
    if progress.rows_total is None:  # a listing goes on: no total, no share, no ETA yet
        listed = getattr(progress, "rows_listed", 0)
        share = f"{listed} listed so far" if listed else "listing"
        counts = f"{progress.rows_done}/? rows ({share})"
    else:
        total = max(progress.rows_total, 1)
        counts = (f"{progress.rows_done}/{progress.rows_total} rows"
                  f" ({100 * progress.rows_done / total:.0f}%)")
    line = (
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} {job_id}: {counts}, "
        f"{progress.images_per_s:.1f} images/s, ETA {_format_eta(progress.eta_s)}, "
        f"{progress.rows_failed} failed"
    )
    return f"{line}; {progress.waiting}" if progress.waiting else line


@dataclass
class Snapshot:
    """Progress as a job record tells it (for following a job that runs elsewhere)."""

    rows_total: int | None  # None: not known yet (a listing goes on)
    rows_done: int
    rows_failed: int
    images_per_s: float
    rows_this_run: int = 0
    waiting: str | None = None

    @property
    def eta_s(self) -> float | None:
        if self.images_per_s <= 0 or self.rows_total is None:
            return None
        return (self.rows_total - self.rows_done) / self.images_per_s


class ProgressDisplay:
    """A context manager whose ``update`` is the pipeline's progress callback.

    ``every_s`` between plain lines: given, else the ``progress_every`` of ``settings`` (the
    command's; None reads them from the environment).
    """

    def __init__(
        self,
        job_id: str,
        *,
        quiet: bool = False,
        every_s: float | None = None,
        settings: Settings | None = None,
    ) -> None:
        self._job_id = job_id
        self._quiet = quiet
        self._tty = sys.stderr.isatty() and sys.stdout.isatty()
        if every_s is None:
            every_s = (Settings.from_env() if settings is None else settings).progress_every
        self._every = every_s
        self._bar: Any = None
        self._last_line = 0.0
        self._last: Progress | Snapshot | None = None

    def __enter__(self) -> ProgressDisplay:
        return self

    def update(self, progress: Progress | Snapshot) -> None:
        self._last = progress
        if self._quiet:
            return
        if self._tty:
            self._draw(progress)
        elif time.monotonic() - self._last_line >= self._every:
            self._last_line = time.monotonic()
            print(log_line(self._job_id, progress), file=sys.stderr, flush=True)

    def _draw(self, progress: Progress | Snapshot) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=progress.rows_total,
                initial=progress.rows_done - progress.rows_this_run,
                unit="img",
                desc=self._job_id,
                dynamic_ncols=True,
                smoothing=0.1,
            )
        if self._bar.total != progress.rows_total and progress.rows_total:
            self._bar.total = progress.rows_total
        self._bar.update(progress.rows_done - self._bar.n)
        if progress.waiting:
            self._bar.set_postfix_str(progress.waiting[:80], refresh=True)
        else:
            self._bar.set_postfix(failed=progress.rows_failed, refresh=False)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._last is not None and not self._quiet and not self._tty:
            print(log_line(self._job_id, self._last), file=sys.stderr, flush=True)
