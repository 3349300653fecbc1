"""PDQ hash lists with every input and output on an S3-compatible server (moto): extract with
extract.pdq=true, the sharded PDQ index, ``retrieval pdq export`` (the CSV on S3) and
``retrieval pdq match`` on Spark (its tasks read the PDQ shards from S3) and locally."""
from __future__ import annotations

import csv
import io

import pytest
from PIL import Image, ImageOps

from retrieval import config, fsio
from retrieval.extract.job import extract
from retrieval.index.build import build_index
from retrieval.pdq.job import export, match
from retrieval.sample import real_photos
from retrieval.search.results import read_results

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N = 6


def test_pdq_export_and_match_on_s3(s3, spark):
    fs, root = s3["fs"], f"{s3['bucket']}/pdq"
    for i, path in enumerate(real_photos("all")[:N]):
        buf = io.BytesIO()
        ImageOps.exif_transpose(Image.open(path)).convert("RGB").save(buf, "JPEG", quality=90)
        fs.pipe(f"{root}/in/{'ab'[i % 2]}/g{i}.jpg", buf.getvalue())
    options = {"s3": {"endpoint_url": s3["endpoint"], "key": "testing", "secret": "testing",
                      "client_kwargs": {"region_name": "us-east-1"}}}
    cfg = config.load(sets=["extract.num_shards=2", "extract.batch_size=4", "extract.pdq=true",
                            "index.quality_queries=0", "index.tune_queries=0", "pdq.shard_rows=1",
                            "pdq.chunk_rows=4", "pdq.dihedral=true"], overrides={"io.storage_options": options})
    feats, index, listed = f"{root}/features", f"{root}/index", f"{root}/b.csv"
    for part in "ab":                 # two feature outputs: two feature files, so two PDQ shards
        assert extract(f"{root}/in/{part}", f"{feats}/{part}", cfg)["pdq"] is True
    im = build_index([f"{feats}/a", f"{feats}/b"], index, cfg, None)
    block = im["pdq"]       # pdq.shard_rows=1: a shard per feature file
    assert block["count"] == N and [s["count"] for s in block["shards"]] == [f["rows"] for f in im["feature_files"]]
    assert len(block["shards"]) == 2, [f["rows"] for f in im["feature_files"]]
    for f in block["files"]:                                  # the shards' files, on S3
        assert fsio.sha256_file(f"{index}/{f['file']}") == f["sha256"]
    assert export(f"{feats}/a", f"{root}/a.csv", cfg)["counts"]["written"] == N // 2
    assert export(f"{feats}/b", listed, cfg)["counts"]["written"] == N // 2
    # a partner's list: both exports in one CSV (written back to S3)
    fs.pipe(listed, (fsio.read_text(f"{root}/a.csv") + fsio.read_text(listed).split("\n", 1)[1]).encode())
    rows = list(csv.DictReader(io.StringIO(fsio.read_text(listed))))
    assert [list(r) for r in rows[:1]] == [["hash", "image_id", "quality"]] and len(rows) == N
    on_spark = match(listed, index, f"{root}/match", cfg, spark)
    assert on_spark["engine"] == "spark" and on_spark["counts"]["queries"] == N and len(on_spark["files"]) == 2
    res = read_results(f"{root}/match")
    top = {r["query_id"]: (r["gallery_id"], r["distance"]) for r in res.to_pylist() if r["rank"] == 1}
    assert top == {r["image_id"]: (r["image_id"], 0) for r in rows}
    assert all(u.startswith(f"{root}/in/") for u in res.column("gallery_uri").to_pylist())
    assert fs.exists(f"{root}/match/errors/part-00000.parquet") and fs.exists(f"{root}/match/_manifest.json")
    local = match(listed, index, f"{root}/match-local", cfg)     # the local engine: the same part files
    assert [f["sha256"] for f in local["files"]] == [f["sha256"] for f in on_spark["files"]]
