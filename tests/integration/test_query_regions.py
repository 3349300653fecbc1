"""Query regions through the real pipeline (real model, faiss, Parquet, Spark): ``extract --role
query`` with ``extract.query_regions`` writes the region rows on both engines alike; the search
merges them to one row per (query, gallery image) with ``query_region`` filled, the same on both
engines and both rerank plans; a photo shown inside a generated screenshot-like page is found
through its content box; calibration counts the regions; evaluate --exact merges them too; the
report draws the region on the query thumbnail."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from retrieval import config, fsio
from retrieval.evaluate import evaluate
from retrieval.extract.features import read_features, read_manifest
from retrieval.extract.job import extract
from retrieval.extract.regions import parse_label
from retrieval.index.build import build_index
from retrieval.search import read_results, search
from tests.unit.test_query_regions import _photo, framed

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REGIONS = "extract.query_regions=[content,center70]"
PHOTOS = ("astronaut", "coffee", "chelsea")
FRAMES = [((900, 700), (150, 260)), ((600, 900), (20, 400)), ((1000, 620), (300, 90))]


@pytest.fixture(scope="module")
def world(sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    names = sorted(os.listdir(sample["gallery"]))[:12]
    gallery = root / "gallery"
    gallery.mkdir()
    for n in names:
        Image.open(os.path.join(sample["gallery"], n)).convert("RGB").save(gallery / (os.path.splitext(n)[0] + ".jpg"))
    for name in PHOTOS:
        _photo(name).save(gallery / f"{name}.jpg", quality=90)
    queries = root / "queries"
    queries.mkdir()
    truth = {}
    for i, ((canvas, at), name) in enumerate(zip(FRAMES, PHOTOS)):   # three photos shown in a page, one plain copy
        photo = _photo(name)
        scale = min((canvas[0] - at[0] - 20) / photo.width, (canvas[1] - at[1] - 20) / photo.height)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)))
        framed(photo, canvas, at).save(queries / f"shot{i}.jpg", quality=90)
        truth[f"shot{i}.jpg"] = (f"{name}.jpg", (at[0] / canvas[0], at[1] / canvas[1],
                                                 (at[0] + photo.width) / canvas[0], (at[1] + photo.height) / canvas[1]))
    src = sorted(os.listdir(gallery))[1]
    Image.open(gallery / src).resize((300, 260)).save(queries / "plain.jpg", quality=85)
    truth["plain.jpg"] = (src, None)
    (queries / "broken.jpg").write_bytes(b"not an image")
    cfg = config.load(sets=["extract.num_shards=1"])
    extract(str(gallery), str(root / "gal"), cfg)
    build_index([str(root / "gal")], str(root / "idx"), cfg)
    qcfg = config.load(sets=["extract.num_shards=2", REGIONS, "extract.role=query"])
    extract(str(queries), str(root / "qf"), qcfg)
    return {"root": root, "gallery": str(gallery), "queries": str(queries), "truth": truth}


def test_extract_writes_region_rows_on_both_engines(world, spark, tmp_path):
    qf = str(world["root"] / "qf")
    m = read_manifest(qf)
    assert m["query_regions"] == ["content", "center70"]
    assert m["counts"]["ok"] == 4 and m["counts"]["errors"] == 1       # broken.jpg: an error row
    t = read_features(qf, ["image_id", "region"]).to_pydict()
    assert m["counts"]["rows"] == len(t["image_id"]) > 4
    by_image: dict[str, list] = {}
    for i, r in zip(t["image_id"], t["region"]):
        by_image.setdefault(i, []).append(r)
    for image, regions in by_image.items():
        assert regions[0] is None                                     # the whole image first
        assert sum(r is not None and r.startswith("center70:") for r in regions) == 1
    for shot, (_, box) in world["truth"].items():
        content = [r for r in by_image[shot] if r and r.startswith("content:")]
        if box is not None:                   # the page's photo found by trimming its flat frame
            assert len(content) == 1 and parse_label(content[0])[1] == pytest.approx(box, abs=0.08)
    spark_out = str(tmp_path / "qf_spark")
    extract(world["queries"], spark_out, config.load(sets=["extract.num_shards=2", REGIONS, "extract.role=query"]),
            engine=spark)
    local, remote = read_features(qf), read_features(spark_out)
    assert local.column("region").to_pylist() == remote.column("region").to_pylist()
    assert local.column("image_id").to_pylist() == remote.column("image_id").to_pylist()
    # a gallery extraction ignores the setting: no region column
    g = str(tmp_path / "g")
    extract(world["gallery"], g, config.load(sets=["extract.num_shards=1", REGIONS]))
    assert "region" not in read_features(g).column_names and read_manifest(g)["query_regions"] == []


def _rows(out: str) -> list[tuple]:
    d = read_results(out).to_pydict()
    return sorted(zip(d["query_id"], d["rank"], d["gallery_id"], d["query_region"],
                      [round(s, 4) for s in d["score"]]))


def test_search_merges_regions_one_row_per_gallery_image(world, spark, tmp_path):
    qf, idx = str(world["root"] / "qf"), str(world["root"] / "idx")
    outs = {}
    for name, sets, engine in (("local", [], None), ("gallery_major", ["search.rerank=gallery"], None),
                               ("spark", [], spark)):
        out = str(tmp_path / name)
        m = search(qf, idx, out, config.load(sets=["search.k=5", "search.query_chunk=4", "search.region_margin=0",
                                                   *sets]), engine)
        outs[name] = out
        assert m["counts"]["queries"] == 4 and m["counts"]["query_rows"] > 4 and m["counts"]["chunks"] >= 2
    assert _rows(outs["local"]) == _rows(outs["gallery_major"]) == _rows(outs["spark"])
    d = read_results(outs["local"]).to_pydict()
    pairs = list(zip(d["query_id"], d["gallery_id"]))
    assert len(pairs) == len(set(pairs)) == 4 * 5                      # one row per (query, gallery image)
    for q in set(d["query_id"]):
        mine = sorted((r, s) for qq, r, s in zip(d["query_id"], d["rank"], d["score"]) if qq == q)
        assert [r for r, _ in mine] == [1, 2, 3, 4, 5]
        assert all(a >= b for (_, a), (_, b) in zip(mine, mine[1:]))   # raw score order (no normalisation)
    top = {q: (g, reg) for q, r, g, reg in zip(d["query_id"], d["rank"], d["gallery_id"], d["query_region"]) if r == 1}
    for q, (src, box) in world["truth"].items():
        assert top[q][0] == src
        if box is not None:                   # the page's photo matched through a region
            assert top[q][1] is not None
    assert any(reg is None for reg in d["query_region"]) and any(reg for reg in d["query_region"])
    # the regions' rows searched without merging would give 3x the rows: the plain search of the whole rows
    assert len(d["query_id"]) == m["counts"]["rows"]
    # search.region_margin: a region wins a gallery image only by more than the margin - the same on both
    # engines; a large margin hands the images the whole image also found back to the whole image
    won = {}
    for name, engine in (("margin_local", None), ("margin_spark", spark)):
        out = str(tmp_path / name)
        m = search(qf, idx, out, config.load(sets=["search.k=5", "search.query_chunk=4", "search.region_margin=0.5"]),
                   engine)
        assert m["params"]["region_margin"] == 0.5
        outs[name] = out
    assert _rows(outs["margin_local"]) == _rows(outs["margin_spark"])
    for name in ("local", "margin_local"):
        d = read_results(outs[name]).to_pydict()
        won[name] = {(q, g) for q, g, reg in zip(d["query_id"], d["gallery_id"], d["query_region"]) if reg}
    assert len(won["margin_local"]) < len(won["local"])
    whole = {(q, g) for q, g, reg in zip(d["query_id"], d["gallery_id"], d["query_region"]) if reg is None}
    assert whole >= {(q, g) for q, g in pairs if (q, g) not in won["local"]}


def test_normalised_regions_calibration_evaluate_and_report(world, tmp_path):
    from retrieval.report.job import build_report

    qf, idx = str(world["root"] / "qf"), str(world["root"] / "idx")
    out = str(tmp_path / "norm")
    cfg = config.load(sets=["search.k=5", f"search.normalize.background={world['root'] / 'gal'}",
                            "search.normalize.k=3"])
    m = search(qf, idx, out, cfg)
    rows = m["counts"]["query_rows"]
    assert m["calibration"]["regions"] == -(-rows // 4) >= 2
    d = read_results(out).to_pydict()
    for q in set(d["query_id"]):
        norms = [n for qq, r, n in sorted(zip(d["query_id"], d["rank"], d["norm_score"])) if qq == q]
        assert all(a >= b for a, b in zip(norms, norms[1:]))           # merged by the normalised score
    assert all(f is not None for f in d["fmr"])
    truth = tmp_path / "truth.csv"
    truth.write_text("query_id,gallery_id,kind\n" + "".join(
        f"{q},{src},{'screenshot' if box else 'plain'}\n" for q, (src, box) in world["truth"].items()))
    metrics = evaluate(out, str(truth), None, cfg, exact_index=idx)
    assert metrics["recall@1"] == 1.0 and metrics["exact"]["metrics"]["recall@1"] == 1.0
    assert metrics["per_kind"]["screenshot"]["queries"] == 3
    report = tmp_path / "report"
    build_report(out, str(report), config.load(sets=["report.thumbnails=files", "report.threshold=-1.0"]),
                 truth_url=str(truth))
    html = (report / "report.html").read_text()
    assert 'class="rbox"' in html and "query region content" in html
    assert fsio.exists(str(report / "flagged.parquet"))
    boxes = [line for line in html.split('class="rbox"')[1:]]
    assert all("left:" in b.split(">")[0] for b in boxes)
    assert np.isfinite(metrics["micro_ap"])
