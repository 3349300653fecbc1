"""Connected components (``Engine.connected_components``) on both engines against networkx: a 20,000-node
chain (the worst case for label propagation) and a random graph of 150,000 edges over 200,000 ids.
Prints each engine's time, the Spark engine's large-star / small-star rounds (its log line) and whether
the labels agree. Not collected by pytest.

    SPARK_LOCAL_IP=127.0.0.1 PYTHONPATH=$PWD python tests/bench/bench_components.py
"""
from __future__ import annotations

import functools
import logging
import time

import networkx as nx
import numpy as np
import pyarrow as pa

from retrieval.engine import LOCAL, as_engine
from retrieval.engine.session import get_spark

EDGES = pa.schema([("src", pa.int64()), ("dst", pa.int64())])


def _part(tables: list, i: int) -> pa.Table:
    return tables[i]


def _labels(t: pa.Table) -> dict:
    return dict(zip(t.column("node").to_pylist(), t.column("component").to_pylist()))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("py4j", "retrieval.progress"):
        logging.getLogger(name).setLevel(logging.WARNING)
    spark = get_spark("local[2]", "bench-components", {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"})
    eng = as_engine(spark)
    rng = np.random.default_rng(0)
    perm = rng.permutation(20_000)
    graphs = {"chain of 20,000 nodes": np.stack([perm[:-1], perm[1:]], 1),
              "random: 150,000 edges over 200,000 ids": rng.integers(0, 200_000, size=(150_000, 2))}
    for name, e in graphs.items():
        tables = [pa.table({"src": c[:, 0], "dst": c[:, 1]}, schema=EDGES) for c in np.array_split(e, 4)]
        fn = functools.partial(_part, tables)
        t0 = time.time()
        local = _labels(LOCAL.connected_components(fn, range(4), EDGES, "cc"))
        t1 = time.time()
        on_spark = _labels(eng.connected_components(fn, list(range(4)), EDGES, "cc", every=600))
        t2 = time.time()
        g = nx.Graph(map(tuple, e.tolist()))
        ref = {v: low for c in nx.connected_components(g) for low in [min(c)] for v in c}
        t3 = time.time()
        print(f"{name}: local (scipy) {t1 - t0:.2f} s, spark {t2 - t1:.1f} s, networkx {t3 - t2:.2f} s; "
              f"{len(set(ref.values())):,} components; agree: local {local == ref}, spark {on_spark == ref}", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
