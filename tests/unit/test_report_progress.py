"""retrieval.progress: log lines, the terminal bar, the summary line, thread safety."""
from __future__ import annotations

import io
import logging
import threading

import pytest

from retrieval.progress import Progress, bar_wanted, fmt_seconds


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_have_count_rate_eta_and_a_summary(caplog):
    caplog.set_level(logging.INFO, logger="retrieval.progress")
    p = Progress("extract part-00001", total=10, every=0.0, unit="images", stream=io.StringIO())
    assert p.bar is False                       # not a terminal: log lines
    p.update(3)
    p.update(0, errors=1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("extract part-00001: 3/10 images (30.0%), ")
    assert "images/s" in lines[0] and "ETA " in lines[0]
    assert lines[1].endswith("1 errors")
    summary = p.finish()
    assert caplog.records[-1].getMessage() == f"done: {summary}" and summary.endswith("s total")
    assert p.finish() == summary and len(caplog.records) == 3      # idempotent


def test_bar_on_a_terminal_replaces_periodic_logs(caplog):
    caplog.set_level(logging.INFO, logger="retrieval.progress")
    tty = _Tty()
    p = Progress("report scan", total=4, every=0.0, unit="rows", stream=tty)
    assert p.bar is True
    for _ in range(4):
        p.update(1)
    p.finish()
    out = tty.getvalue()
    assert "\r" in out and "[" + "#" * 28 + "] 100.0% 4/4 rows" in out and out.endswith("\n")
    assert [r.getMessage()[:5] for r in caplog.records] == ["done:"]   # only the summary is logged


def test_bar_choice(monkeypatch):
    monkeypatch.delenv("RETRIEVAL_PROGRESS", raising=False)
    assert bar_wanted(_Tty()) and not bar_wanted(io.StringIO())
    monkeypatch.setenv("RETRIEVAL_PROGRESS", "log")
    assert not bar_wanted(_Tty())
    monkeypatch.setenv("RETRIEVAL_PROGRESS", "bar")
    assert bar_wanted(io.StringIO())


def test_unknown_total_and_threads():
    p = Progress("scan", every=1e9, stream=io.StringIO())
    threads = [threading.Thread(target=lambda: [p.update(1) for _ in range(2000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.done == 8000 and p.eta() is None and "ETA" not in p.line()
    with Progress("ctx", total=2, stream=io.StringIO()) as q:
        q.update(2)
    assert q.finish().startswith("ctx: 2/2 items (100.0%)")


@pytest.mark.parametrize("s,text", [(5.2, "5s"), (185, "3m05s"), (7620, "2h07m")])
def test_fmt_seconds(s, text):
    assert fmt_seconds(s) == text
