"""The engine interface (retrieval/engine.py) on the local engine, and what does not need a JVM:
error translation, the task-side helpers outside a task. The Spark engine: tests/integration/test_engine_spark.py."""
from __future__ import annotations

import functools
import operator

import pytest

from retrieval import engine as engine_mod
from retrieval.engine import LOCAL, LocalEngine, as_engine, task_attempt, task_threads
from retrieval.index.reader import FeatureInputError
from retrieval.index.store import IndexIntegrityError
from retrieval.integrity import IntegrityError


def _square(x: int) -> int:
    return x * x


def _batch_sums(rows):
    rows = list(rows)
    yield (len(rows), sum(rows))


def test_local_engine_runs_the_task_functions_in_order():
    eng = LocalEngine()
    assert eng.name == "local" and not eng.is_spark and eng.spark is None and eng.parallelism >= 1
    assert eng.map(_square, [3, 1, 2], "t") == [9, 1, 4]
    assert eng.map(_square, [3, 1, 2], "t", threads=3) == [9, 1, 4]         # a pool keeps the order
    assert eng.map(_square, [], "t") == []
    assert eng.map_reduce(_square, [1, 2, 3], operator.add, "t") == 14
    assert eng.map_batches(_batch_sums, [1, 2, 3, 4], 3, "t") == [(4, 10)]   # one batch in this process
    shared = eng.broadcast(b"trained")
    assert shared.value == b"trained"
    shared.destroy()
    assert eng.run("t", 1, lambda: 42) == 42


def test_local_engine_refuses_distributed_training():
    assert LOCAL.run_torch(functools.partial(operator.add, 1), 1, 41) == 42
    with pytest.raises(ValueError, match="train.processes=2 runs through Spark's TorchDistributor"):
        LOCAL.run_torch(_square, 2, 3)


def test_as_engine():
    assert as_engine(None) is LOCAL
    eng = LocalEngine()
    assert as_engine(eng) is eng
    with pytest.raises(TypeError, match="not an engine"):
        as_engine("local[2]")


def test_registered_task_errors_come_back_as_themselves():
    assert {"FeatureInputError", "IndexIntegrityError", "IntegrityError"} <= set(engine_mod.TASK_ERRORS)
    trace = ("org.apache.spark.SparkException: Job aborted due to stage failure: Task 3 in stage 1.0 failed\n"
             "  File \"/x/retrieval/index/quantizer.py\", line 80, in scan_file\n"
             "retrieval.index.reader.FeatureInputError: part-00001.parquet does not match its sha256\n"
             "\tat org.apache.spark.api.python.BasePythonRunner...")
    err = engine_mod.translate(RuntimeError(trace))
    assert type(err) is FeatureInputError and str(err) == "part-00001.parquet does not match its sha256"
    err = engine_mod.translate(RuntimeError("...\nIndexIntegrityError: shard-00001.index is missing\n..."))
    assert type(err) is IndexIntegrityError and str(err) == "shard-00001.index is missing"
    assert type(engine_mod.translate(Exception("IntegrityError: x"))) is IntegrityError
    # other errors, and a registered error raised on the driver itself, are left as they are
    assert engine_mod.translate(RuntimeError("ZeroDivisionError: division by zero")) is None
    assert engine_mod.translate(FeatureInputError("IndexIntegrityError: y")) is None


def test_task_helpers_outside_a_task():
    assert not engine_mod.in_task() and task_attempt() == 0
    assert task_threads(3) == 3 and task_threads(0) >= 1
    assert engine_mod.task_device("cpu") == "cpu"
