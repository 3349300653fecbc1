"""The engine every stage runs on: this process (:class:`LocalEngine`) or Spark tasks
(:class:`SparkEngine`). One interface (:class:`Engine`), two implementations calling the same task
functions; Spark and its session helpers (:mod:`retrieval.engine.session`) are used in this package
only (``tests/unit/test_architecture.py``).

A stage writes its work as module-level task functions over small picklable work units (Spark
ships them by reference) and hands them to the engine:

- :meth:`Engine.map`: one task per item, the results in item order;
- :meth:`Engine.map_reduce`: one task per item, the results merged pairwise (Spark: ``treeReduce``);
- :meth:`Engine.map_batches`: items in ``parts`` contiguous batches, a task yields per batch;
- :meth:`Engine.run_steps`: a keyed plan of :class:`Step` s: a task per item, then per step a
  shuffle of ``(key, value)`` records and a task per key (Spark: ``partitionBy``; locally loops
  over dicts, a step's ``combine`` folding a key's values as they arrive): the search's plans;
- :meth:`Engine.map_arrow`: one task per key of an Arrow table, over its rows as record batches
  (Spark: a partition per key holding its rows as Arrow IPC, no shuffle): the extraction's shards;
- :meth:`Engine.find_duplicates`: the rows of tables read by tasks whose key repeats (Spark: one
  shuffle and a window count; locally a pyarrow group-by): the index's duplicate ids;
- :meth:`Engine.connected_components`: the components of a graph whose edges tasks read (Spark:
  large-star / small-star rounds in DataFrames; locally scipy): the near-duplicate groups;
- :meth:`Engine.graph_groups`: those groups made and written without collecting the pairs (Spark:
  :mod:`retrieval.engine.graph`; locally None, the caller groups in memory);
- :meth:`Engine.broadcast`: a read-only value every task sees (locally: the value itself);
- :meth:`Engine.run`: an action under the engine's progress lines and error translation;
- :meth:`Engine.run_torch`: data-parallel torch training (Spark: ``TorchDistributor``; locally one
  process).

Errors: a task's error of a class registered with :func:`task_error` (bad input, a broken
index, a missing file: errors whose message says what is wrong) comes back on the driver as the
same class with its message, not buried in a Java stack trace.

Task side (inside a task on either engine): :func:`task_attempt`, :func:`in_task`,
:func:`task_threads`, :func:`task_device` (:mod:`retrieval.engine.task`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from retrieval.engine.base import TASK_ERRORS, Engine, Shared, Step, task_error, translate
from retrieval.engine.local import LOCAL, LocalEngine
from retrieval.engine.spark import SparkEngine
from retrieval.engine.task import in_task, task_attempt, task_device, task_threads

__all__ = ["TASK_ERRORS", "Engine", "LOCAL", "LocalEngine", "Shared", "SparkEngine", "Step", "as_engine",
           "in_task", "open_engine", "task_attempt", "task_device", "task_error", "task_threads", "translate"]


def as_engine(engine: Any) -> Engine:
    """An :class:`Engine` for what a caller passed: an engine, a SparkSession, or None (local)."""
    if engine is None:
        return LOCAL
    if isinstance(engine, Engine):
        return engine
    if hasattr(engine, "sparkContext"):
        return SparkEngine(engine)
    raise TypeError(f"not an engine or a SparkSession: {engine!r}")


@contextlib.contextmanager
def open_engine(kind: str, cfg: Any, master: str | None = None, log_level: str | None = None,
                exiting: bool = False) -> Iterator[Engine]:
    """The CLI's engine: ``local``, or ``spark`` with a session from the config (``spark.*``) that is
    stopped afterwards, unless spark-submit owns it. ``master``: the ``--master`` given (None: keep
    spark-submit's, else ``spark.master``). ``exiting``: the process ends right after, so the stop
    does not wait for Python-side server threads (:func:`retrieval.engine.session.stop_spark`)."""
    if kind != "spark":
        yield LOCAL
        return
    from retrieval.engine.session import get_spark, stop_spark

    submitted = bool(os.environ.get("PYSPARK_GATEWAY_PORT"))
    resolved = master if master is not None else ("" if submitted else cfg["spark.master"])
    spark = get_spark(resolved, cfg["spark.app_name"], cfg["spark.conf"], log_level=log_level,
                      fast_start=bool(cfg["spark.fast_start"]))
    try:
        yield SparkEngine(spark)
    finally:
        if not submitted:
            stop_spark(spark, join_python_threads=not exiting)
