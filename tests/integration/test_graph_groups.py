"""``Engine.graph_groups`` on Spark: the near-duplicate groups made and written by Spark from a random
graph of scored pairs give the rows of the in-memory path (scipy components, pandas), and the rows
the driver collects stay the size of the summary, not of the pairs."""
from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark import RDD

from retrieval.duplicates import groups as groups_mod
from retrieval.duplicates.job import _write_part
from retrieval.engine import LOCAL, as_engine


def _part(parts: list, i: int) -> pa.Table:
    return parts[i]


def _pairs(seed: int, n: int = 1500, m: int = 1200) -> list[pa.Table]:
    """Random directed scored pairs over ``n`` string ids (both directions of some, in 4 parts)."""
    rng = np.random.default_rng(seed)
    q, g = rng.integers(0, n, size=(2, m))
    q, g = np.concatenate([q, g[:300]]), np.concatenate([g, q[:300]])   # some pairs found both ways
    keep = q != g
    q, g = q[keep], g[keep]
    ids = [f"img{i:05d}" for i in range(n)]
    t = pa.table({"query_id": [ids[i] for i in q], "gallery_id": [ids[i] for i in g],
                  "query_uri": [f"/x/{ids[i]}.jpg" for i in q], "gallery_uri": [f"/x/{ids[i]}.jpg" for i in g],
                  "score": rng.random(len(q), dtype=np.float32), "norm_score": rng.random(len(q), dtype=np.float32)},
                 schema=groups_mod.KEPT_PAIR_SCHEMA)
    cut = np.array_split(np.arange(t.num_rows), 4)
    return [t.take(pa.array(c)) for c in cut]


def _in_memory(parts: list[pa.Table]) -> tuple[pa.Table, pa.Table]:
    kept = pa.concat_tables(parts)
    edges = pa.table({"src": kept.column("query_id"), "dst": kept.column("gallery_id")}, schema=groups_mod.EDGE_SCHEMA)
    comp = LOCAL.connected_components(functools.partial(_part, [edges]), [0], groups_mod.EDGE_SCHEMA, "cc")
    uris = dict(zip(kept.column("query_id").to_pylist() + kept.column("gallery_id").to_pylist(),
                    kept.column("query_uri").to_pylist() + kept.column("gallery_uri").to_pylist()))
    return groups_mod.make_groups(comp, groups_mod.unordered(kept), uris)


def test_spark_groups_match_the_in_memory_rows_without_collecting_them(spark, tmp_path, monkeypatch):
    parts = _pairs(7)
    groups, edges = _in_memory(parts)
    assert groups.num_rows > 500 and edges.num_rows > 1000
    collected = []                                      # rows every driver-side collect brought back

    def counting(name, cls):
        real = getattr(cls, name)

        def wrapper(self, *a, **k):
            got = real(self, *a, **k)
            collected.append(len(got) if isinstance(got, list) else got.num_rows if hasattr(got, "num_rows") else 0)
            return got
        monkeypatch.setattr(cls, name, wrapper)
    for name in ("collect", "toArrow", "toPandas"):
        counting(name, type(spark.range(1)))             # the session's DataFrame class (classic or not)
    counting("collect", RDD)
    saved = {k: spark.conf.get(k) for k in ("spark.sql.shuffle.partitions", "spark.sql.adaptive.enabled")}
    spark.conf.set("spark.sql.shuffle.partitions", "7")   # several sorted parts, to check their order
    spark.conf.set("spark.sql.adaptive.enabled", "false")
    try:
        summary = as_engine(spark).graph_groups(functools.partial(_part, parts), list(range(len(parts))), groups_mod.KEPT_PAIR_SCHEMA,
                                                functools.partial(_write_part, str(tmp_path)), "groups", largest=3)
    finally:
        for k, v in saved.items():
            spark.conf.set(k, v)
    assert collected and sum(collected) < 100           # counts, sizes, the 3 largest, file names
    got_groups = pq.read_table(tmp_path / "groups").cast(groups_mod.GROUP_SCHEMA)
    got_edges = pq.read_table(tmp_path / "edges").cast(groups_mod.KEPT_SCHEMA)
    assert got_groups.equals(groups) and got_edges.equals(edges)   # the same rows, the same order
    names = {d: [f for f in summary["files"] if f.startswith(d + "/")] for d in ("groups", "edges")}
    assert all(len(v) > 1 and v == sorted(v) for v in names.values()), summary["files"]
    assert summary["sizes"] == groups_mod.size_counts(groups)
    assert summary["largest"] == groups_mod.largest(groups, 3)
    assert summary["pairs_kept"] == sum(p.num_rows for p in parts) and summary["edges"] == edges.num_rows
