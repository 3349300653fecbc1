"""The audit report end to end on a real search output layout: real photos (scikit-image's
bundled files), result Parquet written with the search schema, the manifests of every stage,
hostile ids; then the page is opened in a real headless Chromium."""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from retrieval import config as config_mod
from retrieval import fsio
from retrieval.report import build_report
from retrieval.report.scan import RESULT_SCHEMA

SCRIPT_ID = "<script>alert(1)</script>"
FORMULA_ID = '=HYPERLINK("http://evil")'
EVIL_ERROR = '<img src=x onerror="alert(2)">'
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "horse.png"]


@dataclass
class Run:
    root: str
    results: str
    rows: list[dict]
    truth: str
    gallery_dir: str
    query_dir: str


def _photo(name: str) -> Image.Image:
    import skimage.data

    img = Image.open(os.path.join(skimage.data.data_dir, name))
    img.load()
    return img.convert("RGB")


def _write_parquet(path: str, table: pa.Table) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


def make_run(root: str, model_version: str = "mv-test") -> Run:
    """A complete search output with its upstream manifests, as the pipeline lays them out."""
    gallery_dir, query_dir = os.path.join(root, "gallery"), os.path.join(root, "queries")
    os.makedirs(gallery_dir)
    os.makedirs(query_dir)
    for name in PHOTOS:
        img = _photo(name)
        img.thumbnail((320, 320))
        img.save(os.path.join(gallery_dir, name.rsplit(".", 1)[0] + ".jpg"), quality=90)
    with open(os.path.join(gallery_dir, "broken.jpg"), "wb") as fh:
        fh.write(b"this is not an image")
    gallery = {n: os.path.join(gallery_dir, n) for n in sorted(os.listdir(gallery_dir))}

    # queries: crops / recolours of gallery photos; one id is a script tag, one a formula
    def q(name: str, src: str, op) -> tuple[str, str]:
        img = Image.open(gallery[src]).convert("RGB")
        path = os.path.join(query_dir, name)
        op(img).save(path, quality=85)
        return path

    crop = lambda im: im.crop((20, 20, im.width - 30, im.height - 10))
    grey = lambda im: im.convert("L").convert("RGB")
    flip = lambda im: im.transpose(Image.FLIP_LEFT_RIGHT)
    queries = [  # (query_id, uri, [(gallery_id, score), ...] best first)
        (SCRIPT_ID, q("q1.jpg", "astronaut.jpg", crop), [("astronaut.jpg", 0.97), ("camera.jpg", 0.81), ("horse.jpg", 0.42)]),
        (FORMULA_ID, q("q2.jpg", "chelsea.jpg", grey), [("chelsea.jpg", 0.93), ("coffee.jpg", 0.55)]),
        ("q3", q("q3.jpg", "coffee.jpg", flip), [("coffee.jpg", 0.88), ("broken.jpg", 0.86), ("rocket.jpg", 0.30)]),
        ("q4", q("q4.jpg", "rocket.jpg", crop), [("rocket.jpg", 0.79), ("horse.jpg", 0.61)]),
        ("q5", q("q5.jpg", "horse.jpg", grey), [("camera.jpg", 0.77), ("horse.jpg", 0.74)]),
        ("q6-nomatch", q("q6.jpg", "camera.jpg", flip), [("astronaut.jpg", 0.52), ("rocket.jpg", 0.21)]),
        ("q7-missing", os.path.join(query_dir, "deleted.jpg"), [("horse.jpg", 0.90)]),
        ("q8-low", q("q8.jpg", "chelsea.jpg", flip), [("coffee.jpg", 0.12), ("camera.jpg", -0.05)]),
    ]
    rows = []
    for qid, quri, matches in queries:
        for rank, (gid, score) in enumerate(matches, start=1):
            rows.append({"query_id": qid, "rank": rank, "gallery_id": gid, "score": score,
                         "coarse_score": round(score - 0.1, 3), "query_uri": quri, "gallery_uri": gallery[gid]})

    results = os.path.join(root, "results")
    # q3's rows are split over the two files: the report must still treat q3 as one query
    split = next(i for i, r in enumerate(rows) if r["query_id"] == "q3") + 1
    for no, part in enumerate([rows[:split], rows[split:]]):
        _write_parquet(os.path.join(results, f"part-{no:05d}.parquet"),
                       pa.Table.from_pylist(part, schema=RESULT_SCHEMA))

    index = os.path.join(root, "index")
    gfeat, qfeat = os.path.join(root, "gallery_features"), os.path.join(root, "query_features")
    err_schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("error", pa.string())])
    _write_parquet(os.path.join(gfeat, "errors", "part-00000.parquet"), pa.table(
        {"image_id": ["broken.jpg"], "uri": [gallery["broken.jpg"]],
         "error": ["not an image: looks like text"]}, schema=err_schema))
    fsio.write_json(os.path.join(gfeat, "_manifest.json"), {
        "stage": "extract", "role": "gallery", "input": gallery_dir, "model_version": model_version, "storage": "int8",
        "counts": {"inputs": 7, "ok": 6, "errors": 1},
        "shards": [{"shard": 0, "file": "part-00000.parquet", "errors_file": "errors/part-00000.parquet",
                    "errors": 1, "ok": 6}],
        "timings": {"listing_s": 0.1, "run_s": 3.2, "total_s": 3.5}})
    _write_parquet(os.path.join(qfeat, "errors", "part-00000.parquet"), pa.table(
        {"image_id": ["q7-missing"], "uri": [os.path.join(query_dir, "deleted.jpg")],
         "error": [EVIL_ERROR]}, schema=err_schema))
    fsio.write_json(os.path.join(qfeat, "_manifest.json"), {
        "stage": "extract", "role": "query", "input": query_dir, "model_version": model_version,
        "counts": {"inputs": 9, "ok": 8, "errors": 1},
        "shards": [{"shard": 0, "file": "part-00000.parquet", "errors_file": "errors/part-00000.parquet",
                    "errors": 1, "ok": 8}],
        "timings": {"total_s": 2.5}})
    fsio.write_json(os.path.join(index, "manifest.json"), {
        "stage": "index", "index_key": "IVF16,PQ16", "nlist": 16, "model_version": model_version,
        "feature_files": [{"url": os.path.join(gfeat, "part-00000.parquet"), "rows": 6}],
        "timings": {"train_s": 1.5, "add_s": 0.5, "total_s": 2.4}})
    fsio.write_json(os.path.join(results, "_manifest.json"), {
        "stage": "search", "model_version": model_version, "index": index, "queries": query_dir,
        "query_features": qfeat,
        "counts": {"queries": 9, "query_errors": 1, "queries_with_results": len(queries), "rows": len(rows)},
        "config": {}, "timings": {"encode_s": 1.0, "coarse_s": 0.2, "merge_s": 0.1, "rerank_s": 0.3, "total_s": 1.8}})
    truth = os.path.join(root, "truth.csv")
    with open(truth, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query_id", "gallery_id"])
        for qid, src in [(SCRIPT_ID, "astronaut.jpg"), (FORMULA_ID, "chelsea.jpg"), ("q3", "coffee.jpg"),
                         ("q4", "rocket.jpg"), ("q5", "horse.jpg"), ("q6-nomatch", ""), ("q8-low", "chelsea.jpg")]:
            w.writerow([qid, src])
    return Run(root, results, rows, truth, gallery_dir, query_dir)


def cfg_with(**report) -> config_mod.Config:
    return config_mod.load(overrides={f"report.{k}": v for k, v in report.items()})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    return make_run(str(tmp_path_factory.mktemp("report-run")))


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report-out"))
    summary = build_report(run.results, out, cfg_with(threshold=0.75, top_queries=3, matches_per_query=2),
                           truth_url=run.truth)
    return out, summary


def _html(out: str) -> str:
    with open(os.path.join(out, "report.html"), encoding="utf-8") as fh:
        return fh.read()


def test_counts_bands_and_flagged_files_match_the_rows(run, report):
    out, summary = report
    thr = 0.75
    flagged = [r for r in run.rows if r["score"] >= thr]
    c = summary["counts"]
    assert c["rows"] == len(run.rows)
    assert c["flagged_matches"] == len(flagged)
    assert c["flagged_queries"] == len({r["query_id"] for r in flagged}) == 6
    assert c["flagged_queries_shown"] == 3 and c["flagged_queries_not_shown"] == 3
    assert c["queries"] == 9 and c["queries_with_results"] == 8
    # bands of every match, and of each query's best (rank 1) match
    edges = summary["thresholds"]["bands"]
    expect_m = [0] * (len(edges) + 1)
    expect_q = [0] * (len(edges) + 1)
    for r in run.rows:
        b = sum(r["score"] >= e for e in edges)
        expect_m[b] += 1
        expect_q[b] += r["rank"] == 1
    assert [b["matches"] for b in summary["bands"]] == expect_m
    assert [b["queries"] for b in summary["bands"]] == expect_q
    # flagged.parquet holds exactly the flagged rows, with truth labels
    table = pq.read_table(os.path.join(out, "flagged.parquet"))
    got = {(r["query_id"], r["rank"], r["gallery_id"]) for r in table.to_pylist()}
    assert got == {(r["query_id"], r["rank"], r["gallery_id"]) for r in flagged}
    labels = {(r["query_id"], r["gallery_id"]): r["true_match"] for r in table.to_pylist()}
    assert labels[(SCRIPT_ID, "astronaut.jpg")] is True and labels[(SCRIPT_ID, "camera.jpg")] is False
    assert labels[("q7-missing", "horse.jpg")] is None   # not in the truth file: unlabelled
    # the CSV has the same rows; a formula-looking id is neutralised for spreadsheets
    with open(os.path.join(out, "flagged.csv"), newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == len(flagged)
    assert {r["query_id"] for r in csv_rows} >= {"'" + FORMULA_ID, SCRIPT_ID}
    assert FORMULA_ID in table.column("query_id").to_pylist()   # Parquet keeps the exact value


def test_top_queries_order_and_ground_truth_figures(report):
    _, summary = report
    top = summary["top_flagged"]
    assert [t["query_id"] for t in top] == [SCRIPT_ID, FORMULA_ID, "q7-missing"]
    assert [t["score"] for t in top] == pytest.approx([0.97, 0.93, 0.90], abs=1e-6)
    gt = summary["ground_truth"]
    # true pairs flagged: astronaut, chelsea, coffee, rocket (q5's true source horse is 0.74 < 0.75)
    assert gt["true_pairs_flagged"] == 4 and gt["positives"] == 6
    # labelled flagged rows that are wrong: q1/camera 0.81, q3/broken 0.86, q5/camera 0.77
    assert gt["false_flagged_rows"] == 3
    assert gt["recall"] == pytest.approx(4 / 6) and gt["precision"] == pytest.approx(4 / 7)
    assert summary["errors"] == {"gallery extract": 1, "index": None, "query extract": 1, "search": 1}
    assert summary["versions"]["problems"] == []
    assert len(json.dumps(summary)) < 16_000


def test_html_escapes_everything_and_embeds_thumbnails(run, report):
    out, _ = report
    page = _html(out)
    assert "<script" not in page.lower()
    assert ('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data: \'self\'; '
            "style-src 'unsafe-inline'\">") in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "onerror=" not in page.replace("onerror=&quot;", "")      # the error text is escaped too
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in page
    assert "3 more flagged queries in flagged.parquet" in page
    srcs = re.findall(r'<img src="([^"]*)"', page)
    # shown: 3 queries (q7's file is gone: a placeholder, not a broken <img>) + 2 + 1 + 1 matches
    assert len(srcs) == 2 + 4 and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    for s in srcs:
        img = Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1])))
        assert img.format == "JPEG" and max(img.size) <= 256
    assert "missing file" in page
    for attr in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert not attr.startswith(("/", "file:")), attr       # never an absolute local path
    assert "IVF16,PQ16" in page and "mv-test" in page


def test_thumbnails_as_files_beside_the_report(run, tmp_path):
    out = str(tmp_path / "rep")
    summary = build_report(run.results, out, cfg_with(thumbnails="files", top_queries=100, matches_per_query=5))
    page = _html(out)
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert srcs and all(re.fullmatch(r"thumbs/[0-9a-f]{32}\.jpg", s) for s in srcs)
    for s in srcs:
        assert Image.open(os.path.join(out, s)).format == "JPEG"
    # the corrupt gallery file and the deleted query file are placeholders with the reason
    assert summary["counts"]["thumbnail_errors"] == 2
    assert "not an image" in page
    assert summary["counts"]["flagged_queries_not_shown"] == 0 and "more flagged queries" not in page


def test_thumbnails_link_to_full_size_copies(run, report):
    """Every thumbnail is a link to its full-size copy beside the report (a relative path: works
    offline, without scripts, wherever the folder is copied), a re-encoded JPEG of the source."""
    out, _ = report
    page = _html(out)
    links = re.findall(r'<a class="full" href="([^"]*)" target="_blank" title="open full size"><img src="data:', page)
    assert len(links) == len(re.findall(r"<img ", page)) == 6
    for href in links:
        assert re.fullmatch(r"full/[0-9a-f]{32}\.jpg", href)
        with Image.open(os.path.join(out, href)) as full:
            assert full.format == "JPEG" and max(full.size) > 256    # the sources are 320 px: not shrunk
    assert "<a class=\"full\"" not in _html_without_full(run)


def _html_without_full(run) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        build_report(run.results, out, cfg_with(full_size=0, top_queries=2))
        assert not os.path.exists(os.path.join(out, "full"))
        return _html(out)


def test_thumbnails_only_from_the_input_roots(run, tmp_path, caplog):
    """A result row naming a file outside the inputs the manifests record (a planted /etc/passwd,
    a real photo elsewhere) gets no thumbnail, is counted and logged, and the page warns."""
    res = tmp_path / "res"
    shutil.copytree(run.results, res)
    outside = tmp_path / "elsewhere" / "photo.jpg"
    outside.parent.mkdir()
    shutil.copy(os.path.join(run.gallery_dir, "astronaut.jpg"), outside)
    planted = [{"query_id": "planted", "rank": 1, "gallery_id": "passwd", "score": 0.99, "coarse_score": 0.9,
                "query_uri": str(outside), "gallery_uri": "/etc/passwd"},
               {"query_id": "planted", "rank": 2, "gallery_id": "dotdot", "score": 0.98, "coarse_score": 0.9,
                "query_uri": str(outside), "gallery_uri": os.path.join(run.gallery_dir, "..", "elsewhere.jpg")}]
    pq.write_table(pa.Table.from_pylist(planted, schema=RESULT_SCHEMA), res / "part-00009.parquet")
    m = json.loads((res / "_manifest.json").read_text())
    m["counts"]["rows"] += len(planted)
    (res / "_manifest.json").write_text(json.dumps(m))
    out = str(tmp_path / "out")
    with caplog.at_level("WARNING", logger="retrieval.report.shown"):
        summary = build_report(str(res), out, cfg_with(top_queries=2, matches_per_query=2))
    assert summary["top_flagged"][0]["query_id"] == "planted"
    assert summary["counts"]["thumbnails_outside_roots"] == 3
    assert any("outside the input roots" in r.getMessage() and "/etc/passwd" in r.getMessage() for r in caplog.records)
    page = _html(out)
    assert "3 shown image URI(s) lie outside the input roots the manifests record" in page
    assert page.count("not read: outside the input roots the manifests record") >= 3
    # the planted query block: placeholders only; SCRIPT_ID's block (inside the roots): real thumbnails
    planted_block = page.split('<span class="id">planted</span>')[0].rsplit('<div class="q ', 1)[1]
    assert "<img" not in planted_block
    assert len(re.findall(r"<img ", page)) == 3         # SCRIPT_ID's query + its 2 matches
    assert len(os.listdir(os.path.join(out, "full"))) == 3   # full-size copies of those 3 only


def test_bad_inputs_give_clear_errors(run, tmp_path):
    cfg = cfg_with()
    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        build_report(str(tmp_path / "nothing"), str(tmp_path / "o1"), cfg)
    bad = tmp_path / "bad"
    shutil.copytree(run.results, bad)
    m = json.loads((bad / "_manifest.json").read_text())
    (bad / "_manifest.json").write_text(json.dumps({**m, "stage": "extract"}))
    with pytest.raises(ValueError, match="expected 'search'"):
        build_report(str(bad), str(tmp_path / "o2"), cfg)
    (bad / "_manifest.json").write_text(json.dumps({**m, "counts": {**m["counts"], "rows": 999}}))
    with pytest.raises(ValueError, match="999"):
        build_report(str(bad), str(tmp_path / "o3"), cfg)
    (bad / "_manifest.json").write_text(json.dumps(m))
    pq.write_table(pa.table({"query_id": ["a"], "rank": [1]}), bad / "part-00001.parquet")
    with pytest.raises(ValueError, match=r"part-00001.parquet: missing column"):
        build_report(str(bad), str(tmp_path / "o4"), cfg)
    assert not (tmp_path / "o4" / "summary.json").exists()
    with pytest.raises(FileNotFoundError, match="ground truth"):
        build_report(run.results, str(tmp_path / "o5"), cfg, truth_url=str(tmp_path / "no.csv"))


def test_nothing_shown_still_says_where_the_flagged_are(run, tmp_path):
    summary = build_report(run.results, str(tmp_path / "o"), cfg_with(top_queries=0))
    assert summary["counts"]["flagged_queries"] == 6 and summary["top_flagged"] == []
    page = _html(str(tmp_path / "o"))
    assert "6 flagged queries in flagged.parquet" in page and "<img" not in page
    summary = build_report(run.results, str(tmp_path / "o2"), cfg_with(threshold=0.99))
    assert summary["counts"]["flagged_matches"] == 0
    assert "No match at or above the threshold 0.99" in _html(str(tmp_path / "o2"))
    assert pq.read_table(tmp_path / "o2" / "flagged.parquet").num_rows == 0


def test_missing_upstream_manifests_are_reported_not_fatal(run, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(run.results, res)
    m = json.loads((res / "_manifest.json").read_text())
    m["index"] = str(tmp_path / "gone-index")
    m["query_features"] = None
    (res / "_manifest.json").write_text(json.dumps(m))
    summary = build_report(str(res), str(tmp_path / "out"), cfg_with(thumbnails="none"))
    assert summary["stages"]["index"]["available"] is False
    assert "index manifest not found" in summary["stages"]["index"]["problem"]
    assert summary["stages"]["query extract"]["available"] is False
    page = _html(str(tmp_path / "out"))
    assert "unavailable" in page and "<img" not in page


def test_model_version_mismatch_is_flagged(run, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(run.results, res)
    m = json.loads((res / "_manifest.json").read_text())
    (res / "_manifest.json").write_text(json.dumps({**m, "model_version": "other"}))
    summary = build_report(str(res), str(tmp_path / "out"), cfg_with(thumbnails="none"))
    assert summary["versions"]["problems"]
    assert "Model versions differ" in _html(str(tmp_path / "out"))


def test_cli_report_subcommand(run, tmp_path, capsys):
    from retrieval.cli import main

    out = str(tmp_path / "cli")
    rc = main(["report", "--results", run.results, "--output", out, "--truth", run.truth,
               "--engine", "local", "--set", "report.threshold=0.9", "--set", "report.thumbnails=none"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"]["flagged_matches"] == sum(r["score"] >= 0.9 for r in run.rows)
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["thresholds"]["flag"] == 0.9
    assert main(["report", "--results", str(tmp_path / "none"), "--output", out, "--engine", "local"]) == 2


# ---------------------------------------------------------------------------------------------
# a real browser
def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
                       shell=True, check=False, capture_output=True, timeout=600)
        exe = shutil.which("chromium")
        if exe:
            return exe
    pytest.skip("Debian chromium is not installed and cannot be installed here (apt-get needs root): "
                "apt-get install -y chromium")


HARNESS = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="f" src="report.html" width="1280" height="900"></iframe>
<iframe id="m" src="report.html" width="390" height="900"></iframe>
<script>
function keyElements(doc) {   // what a reviewer must find, in page order
  var main = doc.querySelector("main"), order = [];
  Array.from(main.children).forEach(function (el) { if (el.id) order.push(el.id); });
  var settings = doc.getElementById("settings"), flagged = doc.getElementById("flagged");
  var firstBlock = flagged ? flagged.querySelector(".q") : null;
  return {order: order,
          settings_tag: settings ? settings.tagName : null, settings_open: settings ? settings.open : null,
          review_note: (doc.getElementById("review") || {}).innerText || "",
          threshold_meaning: (doc.getElementById("threshold-meaning") || {}).innerText || "",
          bands: ["confident", "review", "below"].map(function (b) {
            return doc.querySelectorAll("#flagged .band-" + b).length; }),
          legend: doc.querySelectorAll("#review .legend .chip").length,
          full_links: Array.from(doc.querySelectorAll("#flagged a.full")).map(function (a) {
            return [a.getAttribute("href"), a.querySelector("img") ? a.querySelector("img").naturalWidth : 0]; }),
          first_block_before_histogram: !!(firstBlock && doc.getElementById("distribution") &&
            (firstBlock.compareDocumentPosition(doc.getElementById("distribution")) & 4)),
          uri_wbr: doc.querySelectorAll("#flagged .uri wbr").length,
          uri_breaks: Array.from(doc.querySelectorAll(".uri")).map(function (e) {
            var cs = getComputedStyle(e); return cs.wordBreak + "/" + cs.overflowWrap; })
            .filter(function (v, i, a) { return a.indexOf(v) === i; }),
          thumb_px: firstBlock ? firstBlock.querySelector("img").getBoundingClientRect().width : 0};
}
function lineBreaks(doc) {   // where the paths wrap: [breaks at a separator, breaks mid-word (the text)]
  var atSeparator = 0, midWord = [];
  doc.querySelectorAll(".uri").forEach(function (el) {
    var walker = doc.createTreeWalker(el, NodeFilter.SHOW_TEXT), node, prev = null, prevTop = null;
    while ((node = walker.nextNode())) {
      for (var i = 0; i < node.length; i++) {
        var r = doc.createRange(); r.setStart(node, i); r.setEnd(node, i + 1);
        var rects = r.getClientRects();
        if (!rects.length) continue;
        if (prevTop !== null && rects[0].top > prevTop + 2) {
          if (/[\\/_\\-.#=?&\\s]/.test(prev)) atSeparator++; else midWord.push(el.textContent);
        }
        prevTop = rects[0].top; prev = node.data[i];
      }
    }
  });
  return [atSeparator, midWord];
}
window.addEventListener("load", function () {   // fires after the iframes' own load
  var out = {};
  try {
    var doc = document.getElementById("f").contentDocument, imgs = Array.from(doc.images);
    var mob = document.getElementById("m").contentDocument;
    out.keys = keyElements(doc);
    out.mobile_overflow = mob.documentElement.scrollWidth - 390;
    out.mobile_breaks = lineBreaks(mob);
    out.images = imgs.length;
    out.broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                     .map(function (i) { return i.getAttribute("src").slice(0, 60); });
    out.scripts = doc.scripts.length;
    out.placeholders = doc.querySelectorAll(".ph").length;
    out.text = doc.body.innerText.indexOf("<script>alert(1)<\\/script>") >= 0;
  } catch (e) { out.error = String(e); }
  document.getElementById("result").textContent = JSON.stringify(out);
});
</script></body></html>"""
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                "--disable-background-networking", "--disable-extensions"]


def _browser_check(chromium: str, out: str, home: str) -> dict:
    """Load the report inside a same-directory harness page that inspects every <img> once the
    report has loaded (complete and decoded); the report itself carries no script."""
    with open(os.path.join(out, "_harness.html"), "w") as fh:
        fh.write(HARNESS)
    env = {**os.environ, "HOME": home}
    proc = subprocess.run([chromium, *CHROME_FLAGS, "--allow-file-access-from-files",
                           "--virtual-time-budget=10000", "--dump-dom", f"file://{out}/_harness.html"],
                          capture_output=True, text=True, timeout=120, env=env)
    os.remove(os.path.join(out, "_harness.html"))
    m = re.search(r'<pre id="result">([^<]*)</pre>', proc.stdout)
    assert m, f"harness did not run: {proc.stdout[-500:]} {proc.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))


def test_report_in_headless_chromium(run, report, tmp_path):
    chromium = _chromium()
    out, _ = report
    home = str(tmp_path / "home")
    result = _browser_check(chromium, out, home)
    assert result.get("error") is None, result
    assert result["images"] == 6 and result["broken"] == [] and result["scripts"] == 0
    assert result["placeholders"] == 1 and result["text"] is True   # the script id is shown as text
    # the page alone: no console message at all (a CSP violation or a failed load would log one)
    shot = str(tmp_path / "report.png")
    proc = subprocess.run([chromium, *CHROME_FLAGS, "--enable-logging=stderr", "--v=0", "--window-size=1280,2400",
                           f"--screenshot={shot}", f"file://{out}/report.html"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": home})
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape == (2400, 1280) and img.std() > 10     # a rendered page, not a blank one
    # thumbnails written beside the report load too (relative paths, allowed by the page's CSP)
    files_out = str(tmp_path / "files-mode")
    build_report(run.results, files_out, cfg_with(thumbnails="files"))
    result = _browser_check(chromium, files_out, home)
    assert result["images"] > 0 and result["broken"] == [], result


def test_report_is_built_for_review_in_chromium(report, tmp_path):
    """Rendered by a real browser, the page puts the evidence first: the review note (band legend,
    threshold meaning), then the flagged pairs with band-coloured scores and thumbnails linked to
    full-size copies, before the histogram; the settings collapsed in a <details> at the end; at
    390 px wide nothing runs off the side."""
    chromium = _chromium()
    out, _ = report
    result = _browser_check(chromium, out, str(tmp_path / "home"))
    assert result.get("error") is None, result
    k = result["keys"]
    assert k["order"][:3] == ["review", "flagged", "distribution"], k["order"]
    assert k["order"][-1] == "settings" and k["settings_tag"] == "DETAILS" and k["settings_open"] is False
    assert "How to review this report" in k["review_note"] and "Click a thumbnail" in k["review_note"]
    assert "report.threshold" in k["threshold_meaning"] and "0.75" in k["threshold_meaning"]
    assert k["legend"] == 3
    # flagged scores 0.97 .. 0.77 with threshold 0.75 and the confident edge 0.95: both classes shown
    assert k["bands"][0] > 0 and k["bands"][1] > 0 and k["bands"][2] == 0, k["bands"]
    assert len(k["full_links"]) == 6
    for href, natural in k["full_links"]:
        assert re.fullmatch(r"full/[0-9a-f]{32}\.jpg", href) and natural > 0
        assert os.path.isfile(os.path.join(out, href))
    assert k["first_block_before_histogram"] and k["uri_wbr"] > 0
    assert k["uri_breaks"] == ["normal/break-word"], k["uri_breaks"]   # no break-all
    # at 390 px the long paths wrap, each time after a separator (the <wbr>s), never mid-word
    at_separator, mid_word = result["mobile_breaks"]
    assert at_separator > 0 and mid_word == [], result["mobile_breaks"]
    assert k["thumb_px"] == 256
    assert result["mobile_overflow"] <= 0, result["mobile_overflow"]


def test_relative_paths_keep_the_gallery_thumbnails(run, tmp_path, monkeypatch):
    """A run done with relative paths (extract --input gallery, index --features gallery_features, ...):
    the index lists its feature files as it was given them, relative to the working directory, and the
    report reads them so (not against the index folder), so the gallery's input root is known and its
    thumbnails are shown."""
    absolute = build_report(run.results, str(tmp_path / "abs"), cfg_with(top_queries=3, matches_per_query=2))
    root = tmp_path / "run"
    make_run(str(root))
    monkeypatch.chdir(root)

    def edit(path, **changes):
        m = json.loads((root / path).read_text())
        m.update(changes)
        (root / path).write_text(json.dumps(m))

    edit("gallery_features/_manifest.json", input="gallery")
    edit("query_features/_manifest.json", input="queries")
    m = json.loads((root / "index" / "manifest.json").read_text())
    edit("index/manifest.json", feature_files=[{**f, "url": "gallery_features/part-00000.parquet"}
                                               for f in m["feature_files"]])
    edit("results/_manifest.json", index="index", query_features="query_features", queries="queries")
    summary = build_report("results", "out", cfg_with(top_queries=3, matches_per_query=2))
    assert summary["stages"]["gallery extract"]["available"], summary["stages"]["gallery extract"]
    assert summary["counts"]["thumbnails_outside_roots"] == absolute["counts"]["thumbnails_outside_roots"] == 0
    shown = len(re.findall(r"<img ", _html(str(root / "out"))))
    assert shown == len(re.findall(r"<img ", _html(str(tmp_path / "abs")))) and shown >= 6
