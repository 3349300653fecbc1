"""The two engines of an index build: a loop in this process (``spark=None``), or Spark tasks.

Both run the same task functions on the same items, so they write the same bytes.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

from retrieval.index.reader import FeatureInputError
from retrieval.index.shard import ShardJob, ShardResult, run_shard


def shard_task(job: ShardJob, trained: Any, spec) -> ShardResult:
    data = trained.value if hasattr(trained, "value") else trained  # a Spark broadcast, or bytes
    return run_shard(job, data, spec)


_TASK_ERROR = re.compile(r"(FeatureInputError|IndexIntegrityError): ([^\n]+)")


def spark_action(spark, label: str, n_tasks: int, every: float, action: Callable):
    """Run a Spark action; a bad-input error raised in a task comes back as the same clear error
    (not buried in a Java stack trace)."""
    from retrieval.sparkutil import ProgressMonitor

    try:
        with ProgressMonitor(spark, label, total_tasks=n_tasks, every=every):
            return action()
    except Exception as exc:
        m = _TASK_ERROR.search(str(exc))
        if m and not isinstance(exc, FeatureInputError):
            raise FeatureInputError(m.group(2)) from None
        raise


def map_tasks(spark, fn: Callable, items: Sequence, label: str, every: float) -> list:
    if spark is None:
        return [fn(x) for x in items]
    rdd = spark.sparkContext.parallelize(list(items), max(1, len(items))).map(fn)
    return spark_action(spark, label, len(items), every, rdd.collect)


def map_reduce(spark, fn: Callable, items: Sequence, merge: Callable, label: str, every: float):
    if spark is None:
        return functools.reduce(merge, (fn(x) for x in items))
    rdd = spark.sparkContext.parallelize(list(items), max(1, len(items))).map(fn)
    return spark_action(spark, label, len(items), every, lambda: rdd.treeReduce(merge, depth=2))
