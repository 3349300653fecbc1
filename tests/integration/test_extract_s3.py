"""Extraction with every input and output on an S3-compatible server (moto, 127.0.0.1) through fsspec."""
import os

import numpy as np

from retrieval import config
from retrieval.extract.job import extract, read_features, read_manifest
from retrieval.schema import fine_matrix


def test_extract_from_and_to_s3_with_spark(spark, s3, tmp_path):
    from PIL import Image

    fs = s3["fs"]
    src = f"{s3['bucket']}/in/gallery"
    local = tmp_path / "imgs"
    local.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        img = Image.new("RGB", (64, 48), colour)
        img.paste((255, 255, 255), (i * 10, 5, i * 10 + 20, 25))
        img.save(local / f"img{i}.jpg")
    (local / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    for f in os.listdir(local):
        fs.put(str(local / f), f"{src}/sub/{f}")
    out = f"{s3['bucket']}/features/gallery"
    cfg = config.load(sets=["extract.num_shards=2", "extract.storage=float32"],
                      overrides={"io.storage_options": {"s3": {"endpoint_url": s3["endpoint"], "key": "testing",
                                                               "secret": "testing"}}})
    m = extract(src, out, cfg, spark)
    assert m["counts"]["ok"] == 3 and m["counts"]["errors"] == 1
    assert read_manifest(out)["model_version"] == m["model_version"]
    t = read_features(out)     # sha256-verified reads from S3
    assert sorted(t["image_id"].to_pylist()) == ["sub/img0.jpg", "sub/img1.jpg", "sub/img2.jpg"]
    assert all(u.startswith("s3://retrieval-test/in/gallery/sub/") for u in t["uri"].to_pylist())
    local_out = str(tmp_path / "local_out")
    extract(str(local), local_out, cfg)
    assert np.abs(fine_matrix(read_features(local_out)) - fine_matrix(t)).max() < 1e-4
    assert not [p for p in fs.find(out) if "/.tmp-" in p]
