"""Progress reporting for long stages: items done, rate, ETA, and a one-line summary at the end.

Two renderings of the same figures:
- **log lines** (at most every ``every`` seconds, logger ``retrieval.progress``): what Spark tasks,
  spark-submit drivers, Airflow and CI runs write, greppable in executor and driver logs;
- **a progress bar** (tqdm) on stderr, redrawn in place, when stderr is a terminal and the code is
  not running inside a Spark task (a run from a shell). ``RETRIEVAL_PROGRESS=log`` or ``=bar``
  forces one or the other. Log lines printed meanwhile appear above the bar.
Both end with the same ``done: ...`` summary line in the log. Updates are thread-safe.

**One bar per stage.** :func:`stage` opens a stage's overall progress in this process (the
engines: :meth:`retrieval.engine.Engine.progress`, ``map`` and ``run``). A :class:`Progress`
created while one is open (a shard's own progress, in the local engine's loop) draws nothing and
logs its lines at DEBUG only; its counts go to the outermost open stage when they are in the same
unit (images, vectors). In a Spark task no stage is open: a shard's progress is logged as before,
in the executor's log, and the driver shows the tasks of the stage (status tracker).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Iterator, TextIO

from retrieval.console import STDERR

BAR_REDRAW_S = 0.2
BAR_FORMAT = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_noinv_fmt}"
              "{postfix}]")
BAR_FORMAT_NO_TOTAL = "{desc}: {n_fmt}{unit} [{elapsed}, {rate_noinv_fmt}{postfix}]"

_OPEN: list["Progress"] = []        # the open stages of this process, outermost first
_OPEN_LOCK = threading.Lock()


def in_spark_worker() -> bool:
    """A Spark Python worker (its stderr is the executor's log, never a terminal): pyspark starts
    its daemon and workers with ``PYTHON_WORKER_FACTORY_SECRET`` set."""
    return "PYTHON_WORKER_FACTORY_SECRET" in os.environ


def bar_wanted(stream: TextIO) -> bool:
    """A bar on ``stream``: forced by ``RETRIEVAL_PROGRESS``, else when it is a terminal and this is
    not a Spark task."""
    if in_spark_worker():
        return False
    forced = os.environ.get("RETRIEVAL_PROGRESS", "").lower()
    if forced in ("bar", "log"):
        return forced == "bar"
    try:
        tty = stream.isatty()
    except Exception:
        tty = False
    return bool(tty)


def fmt_seconds(s: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _columns(stream: TextIO) -> int:
    """The terminal's width (a terminal of unknown size, e.g. a fresh pty: 100)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns if columns > 0 else 100


def _outermost() -> "Progress | None":
    with _OPEN_LOCK:
        return _OPEN[0] if _OPEN else None


class Progress:
    """``update(n)`` as items complete; ``finish()`` at the end (or use it as a context manager)."""

    def __init__(self, label: str, total: int | None = None, every: float = 10.0,
                 logger: logging.Logger | None = None, unit: str = "items",
                 bar: bool | None = None, stream: TextIO | None = None, brief: bool = False) -> None:
        self.label, self.total, self.every, self.unit = label, total, every, unit
        # brief: a step done within ``every`` seconds leaves no trace (its bar is cleared, its
        # summary line logged at DEBUG), e.g. the local engine's hashing of a few files
        self.brief = brief
        self.log = logger or logging.getLogger("retrieval.progress")
        self.start = self.last = time.monotonic()
        self.done = 0
        self.errors = 0
        self.stream = stream if stream is not None else STDERR
        # inside an open stage: quiet (DEBUG lines, no bar), counting into the stage in the same unit
        outer = _outermost()
        self.quiet = outer is not None
        self.parent = outer if outer is not None and outer.unit == unit else None
        self.bar = False if self.quiet else (bar_wanted(self.stream) if bar is None else bar)
        self._tqdm: Any = None
        self._finished: str | None = None
        self._lock = threading.Lock()
        if self.bar:
            self._open_bar()

    def _open_bar(self) -> None:
        try:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self.total, desc=self.label, unit=f" {self.unit}", file=self.stream,
                              mininterval=BAR_REDRAW_S, ncols=_columns(self.stream), leave=True,
                              bar_format=BAR_FORMAT if self.total else BAR_FORMAT_NO_TOTAL)
        except Exception:          # no terminal after all (or no tqdm): log lines
            self.bar, self._tqdm = False, None

    def update(self, n: int = 1, errors: int = 0) -> None:
        if self.parent is not None:
            self.parent.update(n, errors)
        with self._lock:
            self.done += n
            self.errors += errors
            self._show(n, errors)

    def set_done(self, done: int, total: int | None = None) -> None:
        """Absolute counts (a poller's): ``done`` so far, and the total when it grew."""
        with self._lock:
            if total is not None and total != self.total:
                self.total = total
                if self._tqdm is not None:
                    self._tqdm.total = total
            step = max(0, done - self.done)
            self.done = max(self.done, done)
            self._show(step, 0)

    def _show(self, n: int, errors: int) -> None:
        now = time.monotonic()
        if self._tqdm is not None:
            if errors:
                self._tqdm.set_postfix_str(f"{self.errors} errors", refresh=False)
            self._tqdm.update(n)
        elif now - self.last >= self.every:
            self.last = now
            self.log.log(logging.DEBUG if self.quiet else logging.INFO, "%s", self.line())

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
        rate = self.rate()
        parts.append(f"{rate:.1f} {self.unit}/s" if rate >= 1 or rate == 0 else f"{rate:.3g} {self.unit}/s")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {fmt_seconds(eta)}")
        if self.errors:
            parts.append(f"{self.errors} errors")
        return ", ".join(parts)

    def finish(self) -> str:
        """Log (and return) the one-line summary; idempotent."""
        with self._lock:
            if self._finished is not None:
                return self._finished
            line = f"{self.line()}, {self.elapsed():.1f}s total"
            shown = not self.quiet and not (self.brief and self.elapsed() < self.every)
            if self._tqdm is not None:
                try:
                    self._tqdm.leave = shown
                    self._tqdm.close()
                except Exception:  # a closed terminal must not fail the job
                    pass
            self.log.log(logging.INFO if shown else logging.DEBUG, "done: %s", line)
            self._finished = line
            return line

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


@contextlib.contextmanager
def stage(label: str, total: int | None, unit: str = "items", every: float = 10.0,
          stream: TextIO | None = None, brief: bool = False) -> Iterator[Progress]:
    """A stage's overall progress in this process (module doc): the one bar (or log lines) that the
    progress of its parts, created inside the block in the same ``unit``, counts into."""
    p = Progress(label, total=total, every=every, unit=unit, stream=stream, brief=brief)
    with _OPEN_LOCK:
        _OPEN.append(p)
    try:
        yield p
    finally:
        with _OPEN_LOCK:
            _OPEN.remove(p)
        p.finish()
