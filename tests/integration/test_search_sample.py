"""The whole pipeline on the bundled sample with the real model: extract the gallery, build the
index, search the query IMAGES (encoded with the query role by the search job, on Spark) and
evaluate: each generated copy finds its source at rank 1 for at least 90% of the copies."""
from __future__ import annotations

import json

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
    assert m["query_features"] == fsio.join(out, "query_features")
    qman = json.loads(fsio.read_text(fsio.join(out, "query_features", "_manifest.json")))
    assert qman["role"] == "query" and qman["model_version"] == m["model_version"]
    assert m["counts"]["queries"] + m["counts"]["query_errors"] == sample["n_queries"]

    metrics = evaluate(out, sample["truth"], None, cfg)
    n = metrics["counts"]["matching_queries"]
    print(f"sample: {n} copies of {sample['n_gallery']} gallery photos, recall@1 = "
          f"{metrics['recall@1']:.4f} ({round(metrics['recall@1'] * n)}/{n}), recall@10 = "
          f"{metrics['recall@10']:.4f}, micro-AP = {metrics['micro_ap']:.4f}")
    assert n == sample["n_matching"] and n > 0
    assert metrics["recall@1"] >= 0.90
