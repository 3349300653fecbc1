"""The whole pipeline on the bundled sample with the real model: extract the gallery, build the
index, search the query IMAGES (encoded with the query role by the search job, on Spark) and
evaluate: each generated copy finds its source at rank 1 for at least 90% of the copies."""
from __future__ import annotations

import json

import pytest

from retrieval import config, fsio
from retrieval.evaluate import evaluate
from retrieval.extract.job import extract
from retrieval.search import search


def test_sample_copies_find_their_source(sample, spark, tmp_path):
    from retrieval.index.build import build_index

    cfg = config.load(sets=["extract.num_shards=2"])
    gal = str(tmp_path / "gallery_features")
    extract(sample["gallery"], gal, cfg, engine=None)
    idx = str(tmp_path / "index")
    build_index([gal], idx, cfg, engine=None)
    out = str(tmp_path / "search")
    m = search(sample["queries"], idx, out, cfg, engine=spark)
    assert m["query_features"] == out + ".query_features"      # beside the results, not in them
    qman = json.loads(fsio.read_text(fsio.join(out + ".query_features", "_manifest.json")))
    assert qman["role"] == "query" and qman["model_version"] == m["model_version"]
    assert m["counts"]["queries"] + m["counts"]["query_errors"] == sample["n_queries"]

    metrics = evaluate(out, sample["truth"], None, cfg)
    n = metrics["counts"]["matching_queries"]
    print(f"sample: {n} copies of {sample['n_gallery']} gallery photos, recall@1 = "
          f"{metrics['recall@1']:.4f} ({round(metrics['recall@1'] * n)}/{n}), recall@10 = "
          f"{metrics['recall@10']:.4f}, micro-AP = {metrics['micro_ap']:.4f}")
    assert n == sample["n_matching"] and n > 0
    assert metrics["recall@1"] >= 0.90
    assert fsio.exists(out + ".eval/metrics.json")            # the default evaluation output: beside too
    every_reader_gets_exactly_the_match_rows(out, spark)


def every_reader_gets_exactly_the_match_rows(out: str, spark) -> None:
    """pandas, pyarrow.dataset, Spark and DuckDB's recursive glob read the search output folder as
    exactly its result rows (issue 22: query features inside it were read as rows with a null query_id)."""
    import pandas as pd
    import pyarrow.dataset as ds

    from retrieval.search import read_results

    want = sorted(zip(*read_results(out).select(["query_id", "rank", "gallery_id"]).to_pydict().values()))
    assert len(want) == json.loads(fsio.read_text(fsio.join(out, "_manifest.json")))["counts"]["rows"] > 0

    def rows(qid, rank, gid):
        return sorted(zip(list(qid), [int(r) for r in rank], list(gid)))

    df = pd.read_parquet(out)
    assert rows(df["query_id"], df["rank"], df["gallery_id"]) == want
    t = ds.dataset(out).to_table(columns=["query_id", "rank", "gallery_id"]).to_pydict()
    assert rows(t["query_id"], t["rank"], t["gallery_id"]) == want
    sp = spark.read.parquet(out).select("query_id", "rank", "gallery_id").collect()
    assert rows(*zip(*[tuple(r) for r in sp])) == want
    duckdb = pytest.importorskip("duckdb", reason="pip install duckdb (the test extra)")
    got = duckdb.sql(f"select query_id, rank, gallery_id from read_parquet('{out}/**/*.parquet')").fetchall()
    assert rows(*zip(*got)) == want
