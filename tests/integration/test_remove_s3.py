"""``retrieval remove`` and ``retrieval index --compact`` on an S3-compatible server (moto): the
index, its takedown list and tombstones, the id file and the results all on S3; the removal on
Spark (its tasks read the feature files from S3), the lease taken with a conditional PUT."""
from __future__ import annotations

from retrieval import config, outputs
from retrieval.index import takedowns
from retrieval.index.build import build_index
from retrieval.index.compact import compact
from retrieval.remove.job import remove
from retrieval.search import read_results, search
from tests import synthetic

SPEC = synthetic.SyntheticSpec(n_clusters=20, seed=9, copy_noise=0.2)


def test_remove_search_and_compact_on_s3(s3, spark):
    fs, root = s3["fs"], f"{s3['bucket']}/remove"
    options = {"s3": {"endpoint_url": s3["endpoint"], "key": "testing", "secret": "testing",
                      "client_kwargs": {"region_name": "us-east-1"}}}
    cfg = config.load(sets=["index.vectors_per_shard=500", "index.quality_queries=20", "index.tune_queries=50",
                            "index.nlist=16", "search.nprobe=16", "search.shortlist=50", "search.k=3"],
                      overrides={"io.storage_options": options})
    coarse, fine = synthetic.gallery(1200, SPEC)
    feats, index, res = f"{root}/features", f"{root}/index", f"{root}/results"
    synthetic.write_feature_output(feats, coarse, fine, num_files=2)
    qc, qf, src = synthetic.queries(1200, 30, 0, SPEC)
    synthetic.write_feature_output(f"{root}/queries", qc, qf, num_files=1, role="query", id_prefix="q")
    build_index([feats], index, cfg, None)
    gone = sorted({synthetic.image_id(int(s)) for s in src[:10]})
    fs.pipe(f"{root}/ids.csv", ("image_id\n" + "\n".join(gone + ["nobody"]) + "\n").encode())
    m = remove(index, f"{root}/ids.csv", cfg, spark)
    batch = m["takedowns"]["batches"][-1]
    assert (batch["found"], batch["unknown"], m["takedowns"]["tombstoned_rows"]) == (10, 1, 10)
    assert fs.exists(f"{index}/{takedowns.LIST}") and fs.exists(f"{index}/{m['takedowns']['tombstones']['file']}")
    assert not fs.exists(f"{index}/{outputs.LEASE}")          # released
    search(f"{root}/queries", index, res, cfg, None)
    rows = read_results(res)
    assert rows.num_rows == 30 * 3 and not set(gone) & set(rows.column("gallery_id").to_pylist())
    mc = compact(index, cfg, None)
    assert mc["ntotal"] == 1190 and all(f["url"].startswith("s3://") for f in mc["feature_files"])
    search(f"{root}/queries", index, f"{res}2", cfg, None)
    again = read_results(f"{res}2")
    cols = ["query_id", "rank", "gallery_id"]
    assert again.select(cols).equals(rows.select(cols))
    assert not fs.glob(f"{index}/_takedowns/tombstones-*")
