"""The Spark engine (retrieval/engine/spark.py) against a real local Spark session: the same results as the
local engine (maps, keyed steps, Arrow maps, duplicate keys), broadcasts, and a task's registered error
re-raised on the driver as itself."""
from __future__ import annotations

import operator

import pytest

from retrieval.engine import LOCAL, SparkEngine, Step, as_engine, in_task, task_attempt
from retrieval.index.reader import FeatureInputError
from tests.unit.test_engine import (ARROW_IN, ARROW_OUT, ID_FILES, ID_SCHEMA, STEPS, _all, _by_rest,
                                    _concat, _count_rows, _ids, _key_sums)


def _square(x: int) -> int:
    return x * x


def _batch_sums(rows):
    rows = list(rows)
    if rows:
        yield (len(rows), sum(rows))


def _bad(x: int) -> int:
    if x == 2:
        raise FeatureInputError(f"feature file {x} is not a (complete) feature output")
    return x


def _read_shared(shared, x: int) -> tuple:
    return shared.value[x], in_task(), task_attempt()


def test_spark_engine_matches_the_local_engine(spark):
    eng = as_engine(spark)
    assert isinstance(eng, SparkEngine) and eng.is_spark and eng.name == "spark" and eng.spark is spark
    items = list(range(7))
    assert eng.map(_square, items, "t", every=60) == LOCAL.map(_square, items, "t")
    assert eng.map(_square, [], "t") == []
    assert eng.map_reduce(_square, items, operator.add, "t", every=60) == LOCAL.map_reduce(_square, items, operator.add, "t")
    batches = eng.map_batches(_batch_sums, items, 3, "t", every=60)
    assert len(batches) == 3 and sum(n for n, _ in batches) == 7 and sum(s for _, s in batches) == 21
    shared = eng.broadcast({i: i * 10 for i in items})
    try:
        got = eng.map(lambda x: _read_shared(shared, x), items, "t", every=60)
    finally:
        shared.destroy()
    assert got == [(i * 10, True, 0) for i in items]          # read inside Spark tasks, first attempts


def test_a_task_error_comes_back_as_itself(spark):
    with pytest.raises(FeatureInputError, match=r"^feature file 2 is not a \(complete\) feature output$"):
        as_engine(spark).map(_bad, [1, 2, 3], "t", every=60)


def test_spark_engine_runs_the_local_engines_plans(spark):
    eng = as_engine(spark)
    items = list(range(7))
    assert eng.run_steps("t", items, STEPS, every=60) == LOCAL.run_steps("t", items, STEPS)
    # Spark shuffles a key's values as they are (combine is the local engine's fold)
    folded = [Step(_by_rest), Step(_key_sums, 4, combine=_concat), Step(_all, 1)]
    assert eng.run_steps("t", items, folded, every=60) == [(0, 3, 9), (1, 2, 5), (2, 2, 7), (3, 0, 0)]

    def by_key(table):
        return {r["k"]: (r["n"], sorted(r["v"].split(","))) for r in table.to_pylist()}
    out = eng.map_arrow(_count_rows, ARROW_IN, "k", ARROW_OUT, "t", every=60)
    assert out.schema == ARROW_OUT and out.num_rows == 3         # one task per key
    assert by_key(out) == by_key(LOCAL.map_arrow(_count_rows, ARROW_IN, "k", ARROW_OUT, "t"))

    def rows(table):
        return sorted(table.to_pylist(), key=lambda r: (r["id"], r["file"]))
    dups = eng.find_duplicates(_ids, ID_FILES, "id", ID_SCHEMA, "t", rows=8, every=60)
    assert dups.schema == ID_SCHEMA and len(rows(dups)) == 5
    assert rows(dups) == rows(LOCAL.find_duplicates(_ids, ID_FILES, "id", ID_SCHEMA, "t"))
