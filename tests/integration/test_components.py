"""Connected components as an engine method (retrieval/engine: scipy locally, large-star / small-star in
DataFrames on Spark) against networkx on random graphs of several sizes, with isolated nodes, chains (the
worst case for label propagation), stars, and string node ids."""
from __future__ import annotations

import functools

import networkx as nx
import numpy as np
import pyarrow as pa
import pytest

from retrieval.engine import LOCAL, as_engine

INT_EDGES = pa.schema([("src", pa.int64()), ("dst", pa.int64())])
STR_EDGES = pa.schema([("src", pa.string()), ("dst", pa.string())])


def _part(parts: list, i: int) -> pa.Table:
    return parts[i]


def _graph(kind: str, seed: int) -> tuple[list[tuple], list]:
    """(edges, isolated nodes) of a test graph."""
    rng = np.random.default_rng(seed)
    if kind == "chain":             # one long path, in shuffled order, ids permuted: label propagation's worst case
        perm = rng.permutation(300)
        edges = [(int(perm[i]), int(perm[i + 1])) for i in range(299)]
        return [edges[i] for i in rng.permutation(len(edges))], [1000, 1001]
    if kind == "star":
        return [(0, int(v)) for v in range(1, 80)] + [(int(v), 500) for v in range(400, 500)], [7777]
    n, m = {"tiny": (12, 6), "sparse": (400, 260), "dense": (200, 400), "large": (3000, 2200)}[kind]
    edges = [(int(a), int(b)) for a, b in rng.integers(0, n, size=(m, 2))]
    return edges, [n + 10 + i for i in range(5)]


def _expected(edges: list[tuple], isolated: list) -> dict:
    g = nx.Graph()
    g.add_edges_from(edges)
    g.add_nodes_from(isolated)
    return {v: low for comp in nx.connected_components(g) for low in [min(comp)] for v in comp}


def _tables(edges: list[tuple], isolated: list, schema: pa.Schema, parts: int = 3) -> list[pa.Table]:
    rows = edges + [(v, v) for v in isolated]           # a self-loop declares an isolated node
    cut = np.array_split(np.arange(len(rows)), parts)
    return [pa.table({"src": [rows[i][0] for i in c], "dst": [rows[i][1] for i in c]}, schema=schema) for c in cut]


def _components(eng, edges, isolated, schema=INT_EDGES) -> dict:
    parts = _tables(edges, isolated, schema)
    got = eng.connected_components(functools.partial(_part, parts), list(range(len(parts))), schema, "cc", every=60)
    assert got.column_names == ["node", "component"] and got.schema.field("node").type == schema.field("src").type
    out = dict(zip(got.column("node").to_pylist(), got.column("component").to_pylist()))
    assert len(out) == got.num_rows                  # one row per node
    return out


@pytest.mark.parametrize("kind,seed", [("tiny", 0), ("sparse", 1), ("dense", 2), ("large", 3), ("chain", 4),
                                       ("star", 5)])
def test_local_engine_agrees_with_networkx(kind, seed):
    edges, isolated = _graph(kind, seed)
    assert _components(LOCAL, edges, isolated) == _expected(edges, isolated)


def test_spark_engine_agrees_with_networkx(spark):
    """One Spark run over the union of several graphs (ids offset apart: a random sparse and a random
    dense graph, a 300-node chain, two stars, isolated nodes), against networkx."""
    edges, isolated = [], []
    for n, (kind, seed) in enumerate([("sparse", 1), ("dense", 2), ("chain", 4), ("star", 5)]):
        e, iso = _graph(kind, seed)
        edges += [(a + 10_000 * n, b + 10_000 * n) for a, b in e]
        isolated += [v + 10_000 * n for v in iso]
    expected = _expected(edges, isolated)
    got = _components(as_engine(spark), edges, isolated)
    assert got == expected
    assert len({got[v + 20_000] for v in range(300)}) == 1       # the whole chain is one component


def test_string_ids_and_an_empty_graph_on_both_engines(spark):
    edges = [("b", "a"), ("c", "b"), ("x", "y"), ("q", "q")]
    expected = {"a": "a", "b": "a", "c": "a", "x": "x", "y": "x", "q": "q"}
    for eng in (LOCAL, as_engine(spark)):
        assert _components(eng, edges, [], STR_EDGES) == expected
        empty = eng.connected_components(lambda i: INT_EDGES.empty_table(), [0], INT_EDGES, "cc", every=60)
        assert empty.num_rows == 0
        assert eng.connected_components(lambda i: INT_EDGES.empty_table(), [], INT_EDGES, "cc").num_rows == 0
