"""Progress reporting for long stages: items done, rate, ETA, at most every ``every`` seconds,
and a one-line summary at the end. Under Spark it logs (executor/driver logs); locally it logs
to stderr the same way, so the output is greppable in both."""
from __future__ import annotations

import logging
import time


class Progress:
    def __init__(self, label: str, total: int | None = None, every: float = 10.0,
                 logger: logging.Logger | None = None, unit: str = "items") -> None:
        self.label, self.total, self.every, self.unit = label, total, every, unit
        self.log = logger or logging.getLogger("retrieval.progress")
        self.start = self.last = time.monotonic()
        self.done = 0
        self.errors = 0

    def update(self, n: int = 1, errors: int = 0) -> None:
        self.done += n
        self.errors += errors
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.log.info("%s", self.line())

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        parts = [f"{self.label}: {self.done}"]
        if self.total:
            parts[0] += f"/{self.total} {self.unit} ({100.0 * self.done / self.total:.1f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {max(self.total - self.done, 0) / rate:.0f}s")
        if self.errors:
            parts.append(f"{self.errors} errors")
        return ", ".join(parts)

    def finish(self) -> str:
        line = f"{self.line()}, {time.monotonic() - self.start:.1f}s total"
        self.log.info("done: %s", line)
        return line
