"""The Spark engine's progress on the driver (issue 22, item 6): one bar (a terminal) or log lines
(Airflow, CI) per Spark action, with the tasks done, their rate and the ETA, read from the status
tracker for the action's own job group, over all its stages. Real Spark (the session fixture)."""
from __future__ import annotations

import logging
import operator
import re
import time

from retrieval.engine import SparkEngine

LINE = re.compile(r"^(?P<label>[\w ]+): (?P<done>\d+)/(?P<total>\d+) tasks \([\d.]+%\), [\d.e+-]+ tasks/s")


def _slow(x: int) -> int:
    time.sleep(0.4)
    return x * 10


def _lines(caplog, label: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "retrieval.progress" and label in r.getMessage()]


def test_spark_map_logs_count_rate_and_eta(spark, caplog, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_PROGRESS", "log")         # not a terminal: log lines, no bar
    caplog.set_level(logging.INFO, logger="retrieval.progress")
    engine = SparkEngine(spark)
    assert engine.map(_slow, list(range(8)), "slow map", every=0.3) == [x * 10 for x in range(8)]
    lines = _lines(caplog, "slow map")
    assert lines[-1].startswith("done: slow map: 8/8 tasks (100.0%), "), lines
    during = [m for ln in lines[:-1] if (m := LINE.match(ln))]
    assert during, lines                                     # lines while the tasks ran
    done = [int(m.group("done")) for m in during]
    assert done == sorted(done) and all(m.group("total") == "8" for m in during)
    assert any("ETA " in ln for ln in lines[:-1] if LINE.match(ln) and int(LINE.match(ln).group("done")) > 0)
    assert spark.sparkContext.getLocalProperty("spark.jobGroup.id") is None    # the caller's group restored


def test_spark_action_over_a_shuffle_counts_all_its_stages(spark, caplog, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="retrieval.progress")
    sc = spark.sparkContext
    sc.setJobGroup("callers-group", "the caller's")
    try:
        rdd = sc.parallelize(range(40), 4).map(lambda x: (x % 3, _slow(x))).reduceByKey(operator.add, 3)
        out = dict(SparkEngine(spark).run("shuffled", 3, rdd.collect, every=0.3))
        assert out == {k: sum(10 * x for x in range(40) if x % 3 == k) for k in range(3)}
        assert sc.getLocalProperty("spark.jobGroup.id") == "callers-group"
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
        sc.setLocalProperty("spark.job.description", None)
    lines = _lines(caplog, "shuffled")
    # 4 map tasks + 3 reduce tasks: the count runs over both stages, never backwards
    assert lines[-1].startswith("done: shuffled: 7/7 tasks (100.0%)"), lines
    done = [int(m.group("done")) for ln in lines[:-1] if (m := LINE.match(ln))]
    assert done and done == sorted(done), lines


def test_spark_map_draws_one_bar_on_a_terminal(spark, capsys, caplog, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_PROGRESS", "bar")
    caplog.set_level(logging.INFO, logger="retrieval.progress")
    SparkEngine(spark).map(_slow, list(range(4)), "bar map", every=10.0)
    err = capsys.readouterr().err
    frames = [f for f in err.split("\r") if f.strip()]
    assert frames and all(f.startswith("bar map: ") for f in frames), frames
    assert frames[-1].startswith("bar map: 100%|") and "4/4 tasks [" in frames[-1] and "tasks/s" in frames[-1]
    assert [r.getMessage()[:14] for r in caplog.records if "bar map" in r.getMessage()] == ["done: bar map:"]
