"""Geometric verification (search.geometric) through the real pipeline (real model, faiss, Parquet,
OpenCV, Spark): extract -> index -> search with each query's top rows verified from the images'
uris; the same rows on the local engine, on Spark (verified inside the executors' tasks) and with
the gallery-major rerank; a gallery image that became unreadable is a recorded error, not a crash."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from PIL import Image

from retrieval import config
from retrieval.extract.job import extract
from retrieval.index.build import build_index
from retrieval.search import read_results, search

pytest.importorskip("cv2")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# gate -1: every one of the top 3 rows verified (the default gate, 0.1 on the raw cosine here, would
# leave unrelated photos' low-scoring rows out; it is tested in tests/unit/test_geometric.py and, on both
# engines, by retrieval run in tests/integration/test_run.py)
GEO = ["search.geometric.top=3", "search.geometric.min_inliers=15", "search.geometric.boost=0.5",
       "search.geometric.cap=50", "search.geometric.regions=false", "search.geometric.gate=-1", "search.k=5"]


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


@pytest.fixture(scope="module")
def world(sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("geometric")
    gallery, queries = root / "gallery", root / "queries"
    gallery.mkdir()
    queries.mkdir()
    for n in sorted(os.listdir(sample["gallery"]))[:8]:
        Image.open(os.path.join(sample["gallery"], n)).convert("RGB").save(gallery / (os.path.splitext(n)[0] + ".jpg"))
    for name in ("astronaut", "coffee", "chelsea"):
        _photo(name).save(gallery / f"{name}.jpg", quality=90)
    a = _photo("astronaut")
    a.crop((40, 30, 480, 470)).rotate(10, expand=True).resize((320, 320)).save(queries / "copy.jpg", quality=75)
    _photo("coffee").transpose(Image.FLIP_LEFT_RIGHT).save(queries / "mirror.jpg", quality=80)
    _photo("chelsea").resize((300, 200)).save(queries / "cat.jpg", quality=80)
    cfg = config.load(sets=["extract.num_shards=1"])
    extract(str(gallery), str(root / "gal"), cfg)
    build_index([str(root / "gal")], str(root / "idx"), cfg)
    extract(str(queries), str(root / "qf"), config.load(sets=["extract.num_shards=1", "extract.role=query"]))
    (gallery / "chelsea.jpg").write_bytes(b"replaced by a text file after indexing")   # unreadable from now on
    return root


def _rows(out: str) -> list[tuple]:
    d = read_results(out).to_pydict()
    return sorted(zip(d["query_id"], d["rank"], d["gallery_id"], [round(s, 4) for s in d["score"]],
                      d["inliers"], d["geometric_error"]))


def test_search_verifies_top_rows_on_both_engines(world, spark, tmp_path):
    outs = {}
    for label, sets, engine in (("local", [], None), ("gallery_major", ["search.rerank=gallery"], None),
                                ("spark", [], spark)):
        outs[label] = str(tmp_path / label)
        m = search(str(world / "qf"), str(world / "idx"), outs[label], config.load(sets=GEO + sets), engine=engine)
    assert _rows(outs["local"]) == _rows(outs["gallery_major"]) == _rows(outs["spark"])
    d = read_results(outs["spark"]).to_pydict()
    rows = list(zip(d["query_id"], d["rank"], d["gallery_id"], d["inliers"], d["geometric_error"], d["score"]))
    top = {q: (g, n) for q, r, g, n, _, _ in rows if r == 1}
    assert top["copy.jpg"][0] == "astronaut.jpg" and top["copy.jpg"][1] >= 40        # rotated crop
    assert top["mirror.jpg"][0] == "coffee.jpg" and top["mirror.jpg"][1] >= 40      # mirrored: flip
    for q, r, g, n, err, s in rows:
        if r > 3:
            assert n is None and err is None                                        # below top: not verified
        elif g == "chelsea.jpg":                                                   # unreadable now: recorded
            assert n is None and err.startswith("cannot read gallery image") and "chelsea.jpg" in err
        else:
            assert err is None and n is not None
            if g != top[q][0]:
                assert n < 15                                                      # unrelated photos
    assert any(g == "chelsea.jpg" and r <= 3 for q, r, g, _, _, _ in rows)
    for q in ("copy.jpg", "mirror.jpg"):                                           # boosted scores, in order
        s = [x[5] for x in rows if x[0] == q]
        assert s == sorted(s, reverse=True) and s[0] > 1.0
    m = json.loads((tmp_path / "spark" / "_manifest.json").read_text())
    assert m["schema_version"] == 3 and m["params"]["geometric"]["top"] == 3
    assert m["counts"]["geometric_errors"] >= 1 and m["counts"]["geometric_rows"] >= 6
    assert m["timings"]["geometric_s"] > 0
    t = pq.read_table(tmp_path / "local" / "part-00000.parquet")
    assert t.schema.metadata[b"retrieval.schema_version"] == b"3"


def test_regions_on_both_engines(world, spark, tmp_path):
    """search.geometric.regions: the rows' query regions (the default extract.query_regions) cropped
    and matched too, inside the tasks on Spark: the same rows as locally."""
    sets = [x for x in GEO if "regions" not in x] + ["search.geometric.regions=true"]
    for label, engine in (("local", None), ("spark", spark)):
        search(str(world / "qf"), str(world / "idx"), str(tmp_path / label), config.load(sets=sets), engine=engine)
    assert _rows(str(tmp_path / "local")) == _rows(str(tmp_path / "spark"))
    d = read_results(str(tmp_path / "spark")).to_pydict()
    top = {q: (g, n) for q, r, g, n in zip(d["query_id"], d["rank"], d["gallery_id"], d["inliers"]) if r == 1}
    assert top["copy.jpg"][0] == "astronaut.jpg" and top["copy.jpg"][1] >= 40
    assert any(r is not None for r in d["query_region"])          # the queries have region rows


def test_off_by_default_leaves_the_columns_null(world, tmp_path):
    search(str(world / "qf"), str(world / "idx"), str(tmp_path / "plain"), config.load(sets=["search.k=5"]))
    t = read_results(str(tmp_path / "plain"))
    assert t.num_rows and t.column("inliers").null_count == t.column("geometric_error").null_count == t.num_rows
    m = json.loads((tmp_path / "plain" / "_manifest.json").read_text())
    assert m["params"]["geometric"] is None and "geometric_rows" not in m["counts"]


def test_without_opencv_the_search_stops_before_writing(world, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)               # OpenCV not installed
    with pytest.raises(RuntimeError, match=r"retrieval\[verify\]"):
        search(str(world / "qf"), str(world / "idx"), str(tmp_path / "out"), config.load(sets=GEO))
    assert not list((tmp_path / "out").iterdir())              # not claimed: no lease, identity or part
