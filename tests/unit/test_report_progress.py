"""retrieval.progress: log lines, the terminal bar, the summary line, thread safety."""
from __future__ import annotations

import io
import logging
import re
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
    # tqdm's bar, redrawn in place: label, percentage, count, elapsed<remaining (the ETA), rate
    final = out.split("\r")[-1]
    assert out.startswith("\r") and final.endswith("\n"), out
    assert final.startswith("report scan: 100%|") and "| 4/4 rows [" in final and " rows/s]" in final, final
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, ", final), final
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


def test_one_bar_per_stage_the_parts_count_into_it(caplog, monkeypatch):
    """A stage's parts (a shard's own Progress, in the local engine's loop) draw nothing and log at
    DEBUG only; their counts, in the stage's unit, make the stage's one bar."""
    from retrieval.progress import stage

    monkeypatch.delenv("RETRIEVAL_PROGRESS", raising=False)
    caplog.set_level(logging.DEBUG, logger="retrieval.progress")
    tty = _Tty()
    with stage("extract", total=10, unit="images", every=0.0, stream=tty) as overall:
        assert overall.bar
        for shard, n in enumerate((6, 4)):
            part = Progress(f"extract part-{shard:05d}", total=n, every=0.0, unit="images", stream=tty)
            assert part.quiet and not part.bar and part.parent is overall
            part.update(n - 1)
            part.update(1, errors=1)
            part.finish()
        other = Progress("a nested step", total=3, unit="tasks", stream=tty)   # another unit: not counted
        other.update(3)
        other.finish()
    assert overall.done == 10 and overall.errors == 2
    bars = tty.getvalue().split("\r")
    assert all(b.startswith("extract: ") for b in bars if b), bars      # one bar, nothing else drawn
    assert bars[-1].startswith("extract: 100%|") and "10/10 images" in bars[-1] and "2 errors" in bars[-1]
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert info == [f"done: {overall.finish()}"]                       # the parts' lines are DEBUG
    assert any(r.getMessage().startswith("done: extract part-00001") and r.levelno == logging.DEBUG
               for r in caplog.records)
    assert Progress("after", stream=io.StringIO()).quiet is False       # the stage is closed


def test_local_engine_map_is_one_stage_with_count_rate_eta(caplog, monkeypatch):
    from retrieval.engine import LOCAL

    monkeypatch.setenv("RETRIEVAL_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="retrieval.progress")

    def task(x: int) -> int:
        p = Progress(f"part {x}", total=2, every=0.0, unit="rows")   # the task's own progress: quiet
        p.update(2)
        p.finish()
        return x * x

    assert LOCAL.map(task, list(range(5)), "index shards", every=0.0) == [0, 1, 4, 9, 16]
    lines = [r.getMessage() for r in caplog.records]
    for i in range(1, 6):       # one line per task (every=0): count, share, rate, ETA
        assert lines[i - 1].startswith(f"index shards: {i}/5 tasks ({20.0 * i:.1f}%), "), lines
    assert all("tasks/s" in ln and "ETA " in ln for ln in lines[:5]), lines
    assert lines[-1].startswith("done: index shards: 5/5 tasks (100.0%)") and not any("part " in ln for ln in lines)
    with LOCAL.progress("index", 4, "rows", every=1e9) as overall:
        LOCAL.map(task, [0, 1], "index shards")
    assert overall.done == 4           # the tasks' rows counted into the stage's bar


def test_a_brief_step_leaves_no_trace(caplog, monkeypatch):
    """The local engine's quick steps (hashing a few files): within ``every`` seconds, the bar is
    cleared and the summary is a DEBUG line; a longer one keeps both."""
    monkeypatch.delenv("RETRIEVAL_PROGRESS", raising=False)
    caplog.set_level(logging.DEBUG, logger="retrieval.progress")
    tty = _Tty()
    p = Progress("verify files", total=3, every=60.0, unit="tasks", stream=tty, brief=True)
    p.update(3)
    p.finish()
    assert caplog.records[-1].levelno == logging.DEBUG
    assert not tty.getvalue().endswith("\n")                  # cleared, not left on the screen
    q = Progress("verify files", total=3, every=0.0, unit="tasks", stream=_Tty(), brief=True)
    q.update(3)
    q.finish()
    assert caplog.records[-1].levelno == logging.INFO and q.stream.getvalue().endswith("\n")
