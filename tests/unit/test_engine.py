"""The engine interface (retrieval/engine/) on the local engine, and what does not need a JVM:
error translation, the task-side helpers outside a task. The Spark engine: tests/integration/test_engine_spark.py."""
from __future__ import annotations

import functools
import operator

import pytest

from retrieval import engine as engine_mod
import pyarrow as pa

from retrieval.engine import LOCAL, LocalEngine, Step, as_engine, task_attempt, task_threads
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


# a keyed plan: numbers to (n % 3, [n]); per key the values summed; the sums to one key
def _by_rest(n: int) -> list:
    return [(n % 3, [n])]


def _key_sums(key: int, values) -> list:
    values = list(values)
    return [(0, (key, len(values), sum(sum(v) for v in values)))]


def _all(key: int, values) -> list:
    return sorted(values)


def _concat(a: list, b: list) -> list:
    return a + b


STEPS = [Step(_by_rest), Step(_key_sums, 4), Step(_all, 1)]


def _count_rows(batches):
    """Per task (one key): its key, row count and values in arrival order."""
    t = pa.Table.from_batches(list(batches))
    yield pa.RecordBatch.from_pydict({"k": [t.column("k")[0].as_py()], "n": [t.num_rows],
                                      "v": [",".join(t.column("v").to_pylist())]})


ARROW_OUT = pa.schema([("k", pa.int64()), ("n", pa.int64()), ("v", pa.string())])
ARROW_IN = pa.table({"k": [2, 0, 2, 1, 0, 2], "v": ["a", "b", "c", "d", "e", "f"]})
ID_SCHEMA = pa.schema([("id", pa.string()), ("file", pa.int64())])


def _ids(item: tuple) -> pa.Table:
    file, ids = item
    return pa.table({"id": ids, "file": [file] * len(ids)}, schema=ID_SCHEMA)


ID_FILES = [(0, ["a", "b", "c"]), (1, ["d", "b"]), (2, []), (3, ["c", "e", "c"])]


def test_local_engine_runs_keyed_steps():
    # key 3 has no records: its task still runs (with no values); results of the last step in order
    assert LOCAL.run_steps("t", list(range(7)), STEPS) == [(0, 3, 9), (1, 2, 5), (2, 2, 7), (3, 0, 0)]
    seen = []

    def watch(key, values):
        values = list(values)
        seen.append((key, values))
        return _key_sums(key, values)
    folded = [Step(_by_rest), Step(watch, 4, combine=_concat), Step(_all, 1)]
    # combine folds a key's values as they arrive: one value per key (the same sums)
    assert LOCAL.run_steps("t", list(range(7)), folded) == [(0, 1, 9), (1, 1, 5), (2, 1, 7), (3, 0, 0)]
    assert seen == [(0, [[0, 3, 6]]), (1, [[1, 4]]), (2, [[2, 5]]), (3, [])]
    assert LOCAL.run_steps("t", [], STEPS) == [(0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0)]


def test_local_engine_maps_arrow_by_key():
    out = LOCAL.map_arrow(_count_rows, ARROW_IN, "k", ARROW_OUT, "t")
    assert out.schema == ARROW_OUT
    assert out.to_pylist() == [{"k": 0, "n": 2, "v": "b,e"}, {"k": 1, "n": 1, "v": "d"},
                               {"k": 2, "n": 3, "v": "a,c,f"}]          # keys in order, rows in theirs
    assert LOCAL.map_arrow(_count_rows, ARROW_IN.slice(0, 0), "k", ARROW_OUT, "t").num_rows == 0


def test_local_engine_finds_duplicate_keys():
    dups = LOCAL.find_duplicates(_ids, ID_FILES, "id", ID_SCHEMA, "t", rows=8)
    assert dups.schema == ID_SCHEMA
    assert sorted(dups.to_pylist(), key=lambda r: (r["id"], r["file"])) == [
        {"id": "b", "file": 0}, {"id": "b", "file": 1}, {"id": "c", "file": 0}, {"id": "c", "file": 3},
        {"id": "c", "file": 3}]
    assert LOCAL.find_duplicates(_ids, [], "id", ID_SCHEMA, "t").num_rows == 0


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
