"""search.collapse_groups' row rule (retrieval.search.collapse.collapse) on real Arrow tables."""
from __future__ import annotations

import pyarrow as pa

from retrieval.schema import RESULT_SCHEMA
from retrieval.search.collapse import collapse


def _rows(query_ids, ranks, gallery_ids):
    n = len(query_ids)
    cols = {f.name: pa.nulls(n, f.type) for f in RESULT_SCHEMA}
    cols.update(query_id=pa.array(query_ids), rank=pa.array(ranks, pa.int32()), gallery_id=pa.array(gallery_ids),
                score=pa.array([1.0 - 0.1 * r for r in ranks], pa.float32()))
    return pa.table(cols, schema=RESULT_SCHEMA)


def test_one_row_per_group_and_ranks_renumbered():
    t = _rows(["a", "a", "a", "a", "b", "b"], [1, 2, 3, 4, 1, 2], ["x1", "y", "x2", "z", "x2", "x1"])
    out = collapse(t, {"x1": 0, "x2": 0, "z": 1})
    assert out.column("gallery_id").to_pylist() == ["x1", "y", "z", "x2"]
    assert out.column("rank").to_pylist() == [1, 2, 3, 1]
    assert out.schema == RESULT_SCHEMA


def test_two_queries_of_one_id_in_a_row_stay_two_queries():
    # a query set holding one id twice: each query keeps its own best row of the group, ranks from 1
    t = _rows(["q", "q", "q", "q"], [1, 2, 1, 2], ["x1", "x2", "x2", "y"])
    out = collapse(t, {"x1": 0, "x2": 0})
    assert out.column("gallery_id").to_pylist() == ["x1", "x2", "y"]
    assert out.column("rank").to_pylist() == [1, 1, 2]


def test_nothing_grouped_or_no_rows():
    t = _rows(["a", "a"], [1, 2], ["x", "y"])
    assert collapse(t, {"z": 3}).equals(t)
    assert collapse(t.slice(0, 0), {"x": 0}).num_rows == 0
