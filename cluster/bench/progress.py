"""A one-line progress bar on stderr, redrawn at most a few times a second (no dependency)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``update`` after each finished request; ``close`` ends the line. Silent when disabled,
    so callers never branch on it; when stderr is not a terminal only the final line is written."""

    WIDTH = 30
    MIN_INTERVAL_S = 0.2

    def __init__(self, label: str, total: int | None, duration_s: float | None, *, enabled: bool = True,
                 stream: TextIO | None = None) -> None:  # fmt: skip
        self.label, self.total, self.duration_s = label, total, duration_s
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = self.errors = 0
        self._start = time.monotonic()
        self._drawn = 0.0
        self._live = enabled and self.stream.isatty()

    def update(self, ok: bool) -> None:
        self.done += 1
        self.errors += not ok
        now = time.monotonic()
        if self._live and now - self._drawn >= self.MIN_INTERVAL_S:
            self._drawn = now
            self.stream.write("\r" + self.line(now - self._start))
            self.stream.flush()

    def line(self, elapsed_s: float) -> str:
        fractions = []
        if self.total:
            fractions.append(self.done / self.total)
        if self.duration_s:
            fractions.append(elapsed_s / self.duration_s)
        fraction = min(1.0, max(fractions)) if fractions else 0.0
        filled = round(fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        return f"{self.label} [{bar}] {count} requests, {self.errors} errors, {elapsed_s:.0f} s "

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" if self._live else "") + self.line(time.monotonic() - self._start) + "\n")
            self.stream.flush()
