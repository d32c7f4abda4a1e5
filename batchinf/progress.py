"""How far a running job is: the value the pipeline hands its progress callback."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

QUIET_AFTER_S = 10.0  # no row done for this long: the job is not keeping any ETA


@dataclass
class Progress:
    """How far a job is; handed to the progress callback after every batch."""

    rows_total: int | None  # None while a listing goes on: its rows are not all known yet
    rows_done: int = 0
    rows_failed: int = 0
    rows_this_run: int = 0
    started: float = field(default_factory=time.monotonic)
    startup_s: float = 0.0  # until MIN replicas held the model (decode may begin before)
    waiting: str | None = None  # what the job waits for (resources, replicas), if anything
    processing: bool = False  # MIN replicas hold the model (first batches may decode before)
    replanning: bool = False  # a lost node's reservation is being replaced: no row moves
    rows_listed: int = 0  # a listing's rows so far, while ``rows_total`` is not known
    _moved: tuple[int, float] = (0, 0.0)  # rows done when they last changed, and when

    def begin_processing(self) -> None:
        """The replicas hold the model: from now on the clock measures images, not start-up."""
        now = time.monotonic()
        self.startup_s = now - self.started
        self.started = now
        self.processing = True

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def images_per_s(self) -> float:
        """Rows a second this run; 0 while a lost node's reservation is replaced: no row moves
        then, and a record that kept the last speed would promise an ETA nobody keeps."""
        if self.replanning:
            return 0.0
        return self.rows_this_run / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the run's speed; None while no row moves (re-planning, stalled) or
        while the rows are not all known (a listing goes on)."""
        rate = self.images_per_s
        if rate <= 0 or self.rows_total is None or self.replanning or self.quiet_s > QUIET_AFTER_S:
            return None
        return (self.rows_total - self.rows_done) / rate

    @property
    def quiet_s(self) -> float:
        """Seconds since the rows done last changed (counted from the first time asked)."""
        now = time.monotonic()
        if self._moved[0] != self.rows_done or not self._moved[1]:
            self._moved = (self.rows_done, now)
        return now - self._moved[1]
