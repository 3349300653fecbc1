"""The console of a run: the project's lines on stderr, third-party output in the run's log file.

C and C++ libraries (faiss, OpenMP, BLAS) print to the stderr *file descriptor* directly, e.g.
faiss's ``WARNING clustering 2000 points to 64 centroids: please provide at least 2496 training
points``: Python's ``warnings`` filters and logging levels never see it. :func:`native_output`
wraps such calls: file descriptor 2 goes to a temporary file for the call (``os.dup2``), and what
was printed is then forwarded, line by line, to the logger ``retrieval.thirdparty`` (WARNING for
a line that says warning, ERROR for one that says error, else INFO). Nested and concurrent calls
(threads) share one capture: the first entrant redirects, the last one restores and forwards.

:func:`setup_logging` (the CLI) sends the project's log lines to the console and everything,
third-party lines included, to the run's log file (``RETRIEVAL_LOG_FILE``, default
``<tempdir>/retrieval-logs-<user>/<stage>-<time>-<pid>.log``); the console shows none of the third-party
lines, and one line at the end says how many went to the file. Spark's Python workers on this
machine (local masters) inherit ``RETRIEVAL_LOG_FILE`` and append their third-party lines to the
same file; on a cluster, where that path does not exist, they go to the executor's log.
While fd 2 is redirected, the console handler (:class:`ConsoleStream`) still writes to the
terminal. The capture's file lies in the temporary directory (``retrieval-stderr-*``) and is
removed once read: after a hard crash inside a wrapped call it is left there, with what the
library printed.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import getpass
import io
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Iterator

LOGGER = "retrieval.thirdparty"
LOG_FILE_ENV = "RETRIEVAL_LOG_FILE"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_lock = threading.RLock()
_state: dict = {"depth": 0, "saved": None, "fd": None, "path": None, "sources": set()}


class ConsoleStream(io.TextIOBase):
    """The terminal's stderr, also while fd 2 is captured: for log handlers and progress bars."""

    def write(self, s: str) -> int:
        with _lock:
            saved = _state["saved"]
            if saved is None:
                return sys.stderr.write(s)
            data = s.encode("utf-8", "replace")
            while data:
                data = data[os.write(saved, data):]
            return len(s)

    def flush(self) -> None:
        with _lock:
            if _state["saved"] is None:
                sys.stderr.flush()

    def isatty(self) -> bool:
        with _lock:
            saved = _state["saved"]
            return os.isatty(saved) if saved is not None else sys.stderr.isatty()

    def fileno(self) -> int:
        """The terminal's descriptor (tqdm asks it for the terminal's width)."""
        with _lock:
            saved = _state["saved"]
            return saved if saved is not None else sys.stderr.fileno()


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None)
    except OSError:     # pragma: no cover - no C library symbols: nothing buffered to lose
        return None


STDERR = ConsoleStream()


class _LogStream(ConsoleStream):
    """The console log handler's stream: a progress bar on the terminal is cleared before a log
    line and redrawn after it (tqdm's ``external_write_mode``), so lines and bar do not mix."""

    def write(self, s: str) -> int:
        tqdm_mod = sys.modules.get("tqdm")
        if tqdm_mod is not None and getattr(tqdm_mod.tqdm, "_instances", None):
            with tqdm_mod.tqdm.external_write_mode(file=STDERR):
                return STDERR.write(s)
        return STDERR.write(s)


def _flush_c_stdio() -> None:
    libc = _libc()
    if libc is not None:
        libc.fflush(None)


def _enter(source: str) -> None:
    with _lock:
        _state["depth"] += 1
        _state["sources"].add(source)
        if _state["depth"] > 1:
            return
        try:
            sys.stderr.flush()
        except Exception:
            pass
        try:
            fd, path = tempfile.mkstemp(prefix="retrieval-stderr-", suffix=".txt")
        except OSError:
            return                              # no temporary directory: leave fd 2 alone
        try:
            saved = os.dup(2)
        except OSError:                         # no fd 2 at all: nothing to capture
            os.close(fd)
            os.unlink(path)
            return
        _flush_c_stdio()
        os.dup2(fd, 2)
        _state.update(saved=saved, fd=fd, path=path)


def _leave() -> tuple[str, list[str]]:
    with _lock:
        _state["depth"] -= 1
        if _state["depth"] > 0 or _state["saved"] is None:
            if _state["depth"] == 0:
                _state["sources"].clear()
            return "", []
        _flush_c_stdio()
        try:
            sys.stderr.flush()
        except Exception:
            pass
        saved, fd, path = _state["saved"], _state["fd"], _state["path"]
        os.dup2(saved, 2)
        os.close(saved)
        sources = sorted(_state["sources"])
        _state.update(saved=None, fd=None, path=None)
        _state["sources"] = set()
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(fd, "rb") as fh:
            text = fh.read().decode("utf-8", "replace")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return text, sources


def _level(line: str) -> int:
    low = line.lower()
    if "error" in low or "fatal" in low:
        return logging.ERROR
    if "warn" in low:
        return logging.WARNING
    return logging.INFO


def forward(text: str, source: str) -> int:
    """Log each non-empty line of ``text`` (what ``source`` printed) to ``retrieval.thirdparty``;
    the number of lines."""
    log = _thirdparty_logger()
    n = 0
    for line in text.splitlines():
        if line.strip():
            log.log(_level(line), "%s: %s", source, line.rstrip())
            n += 1
    return n


@contextlib.contextmanager
def native_output(source: str) -> Iterator[None]:
    """Capture what C/C++ code prints on fd 2 during the block and forward it to the logger
    ``retrieval.thirdparty`` (module doc). ``source``: who prints (``faiss``), named in the lines."""
    _enter(source)
    try:
        yield
    finally:
        text, sources = _leave()
        if text:
            forward(text, "/".join(sources) or source)


# ---------------------------------------------------------------------------------------------
# the run's log file
def _thirdparty_logger() -> logging.Logger:
    """The third-party logger; in a process without logging configuration (a Spark Python worker)
    whose environment names a log file that exists here, with that file as its handler."""
    log = logging.getLogger(LOGGER)
    with _lock:
        if not log.handlers and not logging.getLogger().handlers:
            path = os.environ.get(LOG_FILE_ENV)
            if path and os.path.isdir(os.path.dirname(os.path.abspath(path))):
                handler = logging.FileHandler(path, encoding="utf-8", delay=True)
                handler.setFormatter(logging.Formatter(FORMAT.replace("%(name)s", "%(name)s[%(process)d]")))
                log.addHandler(handler)
                log.setLevel(logging.INFO)
                log.propagate = False
    return log


def default_log_file(stage: str) -> str:
    """``<tempdir>/retrieval-logs-<user>/<stage>-<time>-<pid>.log`` (one directory per user: a
    shared machine's temporary directory is everyone's)."""
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"retrieval-logs-{user}",
                        f"{stage}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log")


def _not_thirdparty(record: logging.LogRecord) -> bool:
    return not record.name.startswith(LOGGER)


def setup_logging(level: int, stage: str, log_file: str | None = None) -> str | None:
    """The CLI's logging: the project's lines at ``level`` on the console (:class:`ConsoleStream`),
    the same plus third-party output in the run's log file (``log_file``, else ``RETRIEVAL_LOG_FILE``,
    else :func:`default_log_file`), whose path is returned and put in ``RETRIEVAL_LOG_FILE`` for
    Spark's local Python workers. Like ``logging.basicConfig``, nothing is changed when the root
    logger has handlers already (then None)."""
    root = logging.getLogger()
    if root.handlers:
        return None
    path = log_file or os.environ.get(LOG_FILE_ENV) or default_log_file(stage)
    formatter = logging.Formatter(FORMAT)
    console = logging.StreamHandler(_LogStream())
    console.addFilter(_not_thirdparty)
    handlers: list[logging.Handler] = [console]
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        handlers.append(logging.FileHandler(path, encoding="utf-8", delay=True))
        os.environ[LOG_FILE_ENV] = path
    except OSError as exc:
        path = None
        print(f"retrieval {stage}: cannot write the log file ({exc}): third-party output is dropped",
              file=sys.stderr)
    for h in handlers:
        h.setFormatter(formatter)
        root.addHandler(h)
    root.setLevel(level)
    return path


def thirdparty_lines(log_file: str | None) -> int:
    """How many third-party lines (this process's and its Spark workers') the log file holds."""
    if not log_file or not os.path.exists(log_file):
        return 0
    marker = f" {LOGGER}"
    with open(log_file, encoding="utf-8", errors="replace") as fh:
        return sum(1 for line in fh if marker in line)
