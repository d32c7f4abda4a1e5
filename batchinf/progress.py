"""How far a running job is: the value the pipeline hands its progress callback."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    """How far a job is; handed to the progress callback after every batch."""

    rows_total: int
    rows_done: int = 0
    rows_failed: int = 0
    rows_this_run: int = 0
    started: float = field(default_factory=time.monotonic)
    startup_s: float = 0.0  # until MIN replicas held the model (decode may begin before)
    waiting: str | None = None  # what the job waits for (resources, replicas), if anything
    processing: bool = False  # MIN replicas hold the model (first batches may decode before)

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
        return self.rows_this_run / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.images_per_s
        return (self.rows_total - self.rows_done) / rate if rate > 0 else None
