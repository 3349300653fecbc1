"""The whole pipeline with every input and output on an S3-compatible server (moto on 127.0.0.1,
through fsspec/s3fs and pyarrow's S3 filesystem), on Spark: extract the gallery images -> build
the index -> search the query images (encoded by the search job) -> evaluate -> report.
Nothing is staged on local disk: the configuration only carries ``io.storage_options``."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from retrieval import config, fsio
from retrieval.report.job import build_report
from retrieval.evaluate import evaluate
from retrieval.extract.job import extract
from retrieval.search import read_results, search

N_GALLERY, N_COPIES, N_OTHER = 10, 4, 2


def drawing(seed: int, size: int = 128):
    """A distinct picture: coloured shapes and lines on a coloured background."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(5):
        x0, y0 = (int(v) for v in rng.integers(0, size - 30, 2))
        w, h = (int(v) for v in rng.integers(20, 70, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        [d.ellipse, d.rectangle][int(rng.integers(0, 2))]((x0, y0, x0 + w, y0 + h), fill=colour)
    for _ in range(3):
        d.line([tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)],
               fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=4)
    return img


def jpeg(img, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bucket(s3):
    """Gallery images, query images (copies + unrelated) and the truth CSV, uploaded to S3."""
    from PIL import Image

    fs, root = s3["fs"], f"{s3['bucket']}/pipeline"
    truth = ["query_id,gallery_id"]
    for i in range(N_GALLERY):
        fs.pipe(f"{root}/in/gallery/g{i:02d}.jpg", jpeg(drawing(i)))
    for i in range(N_COPIES):   # a copy: cropped, rescaled, brighter, re-encoded at low quality
        img = drawing(i).crop((8, 6, 120, 122)).resize((100, 104), Image.BILINEAR)
        img = Image.eval(img, lambda v: min(255, int(v * 1.1) + 8))
        fs.pipe(f"{root}/in/queries/copy{i}.jpg", jpeg(img, 55))
        truth.append(f"copy{i}.jpg,g{i:02d}.jpg")
    for i in range(N_OTHER):
        fs.pipe(f"{root}/in/queries/other{i}.jpg", jpeg(drawing(1000 + i)))
        truth.append(f"other{i}.jpg,")
    fs.pipe(f"{root}/in/truth.csv", ("\n".join(truth) + "\n").encode())
    return {**s3, "root": root}


def test_extract_index_search_evaluate_report_all_on_s3(bucket, spark, tmp_path, monkeypatch):
    from retrieval.index.build import build_index

    monkeypatch.chdir(tmp_path)            # a stray relative write would land here: checked below
    root, fs = bucket["root"], bucket["fs"]
    options = {"s3": {"endpoint_url": bucket["endpoint"], "key": "testing", "secret": "testing",
                      "client_kwargs": {"region_name": "us-east-1"}}}
    cfg = config.load(sets=["extract.num_shards=2", "search.shortlist=8", "search.k=3",
                            "search.query_chunk=4", "report.thumbnails=embed"],
                      overrides={"io.storage_options": options})
    feats, idx, out = f"{root}/features/gallery", f"{root}/index", f"{root}/search"

    m = extract(f"{root}/in/gallery", feats, cfg, spark)
    assert m["counts"]["ok"] == N_GALLERY and m["counts"]["errors"] == 0
    im = build_index([feats], idx, cfg, spark)
    assert im["ntotal"] == N_GALLERY and all(f["url"].startswith("s3://") for f in im["feature_files"])
    sm = search(f"{root}/in/queries", idx, out, cfg, spark)
    # query_chunk counts feature rows: with the default query regions each image has 1-3, so >= 2 chunks
    assert sm["counts"]["queries"] == N_COPIES + N_OTHER and sm["counts"]["chunks"] >= 2
    assert sm["counts"]["query_rows"] > sm["counts"]["queries"]
    assert sm["query_features"] == f"{out}.query_features"    # beside the results, not in them

    rows = read_results(out).to_pydict()
    top = {q: g for q, r, g in zip(rows["query_id"], rows["rank"], rows["gallery_id"]) if r == 1}
    assert all(top[f"copy{i}.jpg"] == f"g{i:02d}.jpg" for i in range(N_COPIES)), top
    assert all(u.startswith(f"{root}/in/") for u in rows["query_uri"] + rows["gallery_uri"])

    metrics = evaluate(out, f"{root}/in/truth.csv", f"{root}/eval", cfg)
    assert metrics["recall@1"] == 1.0
    summary = build_report(out, f"{root}/report", cfg, truth_url=f"{root}/in/truth.csv")
    assert summary["counts"]["queries"] == N_COPIES + N_OTHER
    assert summary["counts"]["thumbnails"] > 0 and summary["counts"]["thumbnail_errors"] == 0
    assert summary["counts"]["thumbnails_outside_roots"] == 0          # the inputs the manifests record
    assert fs.find(f"{root}/report/full")                             # full-size copies on S3 too
    html = fsio.read_text(f"{root}/report/report.html")
    assert "data:image/jpeg;base64," in html               # thumbnails read back from S3

    # every stage's completion marker is on S3, and no temporary file was left behind
    for marker in (f"{feats}/_manifest.json", f"{idx}/_manifest.json", f"{out}/_manifest.json",
                   f"{out}.query_features/_manifest.json", f"{root}/eval/metrics.json", f"{root}/eval/_manifest.json",
                   f"{root}/report/summary.json", f"{root}/report/_manifest.json"):
        assert fs.exists(marker), marker
    assert json.loads(fs.cat_file(f"{root}/report/summary.json"))["stage"] == "report"
    assert not [p for p in fs.find(root) if "/.tmp-" in p]
    assert os.listdir(tmp_path) == []                      # nothing written to local disk
