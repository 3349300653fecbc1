"""Progress reporting for long stages: items done, rate, ETA, and a one-line summary at the end.

Two renderings of the same figures:
- **log lines** (at most every ``every`` seconds, logger ``retrieval.progress``): what Spark tasks,
  spark-submit drivers and any non-interactive run write, greppable in executor and driver logs;
- **a progress bar** on stderr, redrawn in place, when stderr is a terminal and the code is not
  running inside a Spark task (local runs from a shell). ``RETRIEVAL_PROGRESS=log`` or ``=bar``
  forces one or the other.
Both end with the same ``done: ...`` summary line in the log. Updates are thread-safe.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

from retrieval.engine.task import in_task

BAR_WIDTH = 28
BAR_REDRAW_S = 0.2


def bar_wanted(stream: TextIO) -> bool:
    """A bar on ``stream``: forced by ``RETRIEVAL_PROGRESS``, else when it is a terminal and this is
    not a Spark task."""
    forced = os.environ.get("RETRIEVAL_PROGRESS", "").lower()
    if forced in ("bar", "log"):
        return forced == "bar"
    try:
        tty = stream.isatty()
    except Exception:
        tty = False
    return bool(tty) and not in_task()


def fmt_seconds(s: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


class Progress:
    """``update(n)`` as items complete; ``finish()`` at the end (or use it as a context manager)."""

    def __init__(self, label: str, total: int | None = None, every: float = 10.0,
                 logger: logging.Logger | None = None, unit: str = "items",
                 bar: bool | None = None, stream: TextIO | None = None) -> None:
        self.label, self.total, self.every, self.unit = label, total, every, unit
        self.log = logger or logging.getLogger("retrieval.progress")
        self.start = self.last = time.monotonic()
        self.done = 0
        self.errors = 0
        self.stream = stream if stream is not None else sys.stderr
        self.bar = bar_wanted(self.stream) if bar is None else bar
        self._drawn = 0.0
        self._finished: str | None = None
        self._lock = threading.Lock()

    def update(self, n: int = 1, errors: int = 0) -> None:
        with self._lock:
            self.done += n
            self.errors += errors
            now = time.monotonic()
            if self.bar:
                if now - self._drawn >= BAR_REDRAW_S or (self.total and self.done >= self.total):
                    self._drawn = now
                    self._draw()
            elif now - self.last >= self.every:
                self.last = now
                self.log.info("%s", self.line())

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def rate(self) -> float:
        return self.done / max(self.elapsed(), 1e-9)

    def eta(self) -> float | None:
        """Seconds left at the mean rate so far (None without a total or before the first item)."""
        rate = self.rate()
        if not self.total or rate <= 0:
            return None
        return max(self.total - self.done, 0) / rate

    def line(self) -> str:
        parts = [f"{self.label}: {self.done}"]
        if self.total:
            parts[0] += f"/{self.total} {self.unit} ({100.0 * self.done / self.total:.1f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{self.rate():.1f} {self.unit}/s")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {fmt_seconds(eta)}")
        if self.errors:
            parts.append(f"{self.errors} errors")
        return ", ".join(parts)

    def _bar_text(self) -> str:
        if self.total:
            frac = min(max(self.done / self.total, 0.0), 1.0)
            full = int(round(frac * BAR_WIDTH))
            head = f"[{'#' * full}{'.' * (BAR_WIDTH - full)}] {100 * frac:5.1f}% {self.done}/{self.total}"
        else:
            head = f"{self.done}"
        text = f"{self.label} {head} {self.unit} {self.rate():.1f}/s"
        eta = self.eta()
        if eta is not None:
            text += f" ETA {fmt_seconds(eta)}"
        if self.errors:
            text += f" {self.errors} errors"
        return text

    def _draw(self, end: str = "") -> None:
        try:
            self.stream.write("\r\x1b[2K" + self._bar_text() + end)
            self.stream.flush()
        except Exception:  # a closed terminal must not fail the job
            self.bar = False

    def finish(self) -> str:
        """Log (and return) the one-line summary; idempotent."""
        with self._lock:
            if self._finished is not None:
                return self._finished
            line = f"{self.line()}, {self.elapsed():.1f}s total"
            if self.bar:
                self._draw(end="\n")
            self.log.info("done: %s", line)
            self._finished = line
            return line

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()
