"""Hostile input to the index, search, evaluate and report stages: ids with ``../``, absolute paths,
URL schemes or markup stay data, and file names taken from manifests cannot point outside the
directory of the manifest: no stage writes (or reads a listed file) outside its roots.
(Extraction: tests/unit/test_security.py; HTML escaping: tests/unit/test_report.py and
tests/integration/test_report.py; decoder caps: tests/unit/test_preprocess.py; config values:
tests/unit/test_config.py.)"""
from __future__ import annotations

import json
import os

import retrieval.index  # noqa: F401  (before faiss)
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval import config, fsio

from tests import synthetic
from retrieval.report.job import build_report
from retrieval.evaluate import evaluate
from retrieval.index.build import build_index
from retrieval.search import read_results, search

N = 1200
SPEC = synthetic.SyntheticSpec(n_clusters=40, seed=13)
HOSTILE = ["../../escape", "/abs/escape", "s3://other-bucket/escape", "file:///tmp/escape",
           "C:\\escape", "<img src=x onerror=alert(1)>", "..", "a/../../../escape"]
INDEX = config.load(sets=["index.index_key=IVF8,PQ16x4", "index.quality_queries=50"])


def files_under(root) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def rewrite(output: str, part: str, column: str, values: list[str]) -> None:
    """Replace a column of one part file and re-record its sha256: a hostile but consistent producer."""
    path = os.path.join(output, part)
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index(column), column, pa.array(values, pa.string()))
    pq.write_table(t, path)
    m = json.load(open(os.path.join(output, "_manifest.json")))
    for s in m.get("shards", []) + m.get("files", []):
        if s["file"] == part:
            s["sha256"] = fsio.sha256_file(path)
    json.dump(m, open(os.path.join(output, "_manifest.json"), "w"))


def edit_manifest(output: str, name: str, key: str, value: str) -> None:
    path = os.path.join(output, name)
    m = json.load(open(path))
    m[key][0]["file"] = value
    json.dump(m, open(path, "w"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    coarse, fine = synthetic.gallery(N, SPEC)
    gal = str(root / "gallery")
    synthetic.write_feature_output(gal, coarse, fine, num_files=2)
    idx = str(root / "index")
    build_index([gal], idx, INDEX)
    qc, qf, _ = synthetic.queries(N, len(HOSTILE), 0, SPEC)
    queries = str(root / "queries")
    synthetic.write_feature_output(queries, qc, qf, num_files=1, role="query", id_prefix="q")
    rewrite(queries, "part-00000.parquet", "image_id", HOSTILE)
    rewrite(queries, "part-00000.parquet", "uri", HOSTILE)
    return {"root": root, "gallery": gal, "index": idx, "queries": queries}


def test_hostile_query_ids_stay_data_in_search_evaluate_and_report(world, tmp_path):
    before = files_under(tmp_path)
    out = tmp_path / "out" / "search"
    search(world["queries"], world["index"], str(out), config.load(sets=["search.shortlist=20", "search.k=3"]))
    got = read_results(str(out)).to_pydict()
    assert sorted(set(got["query_id"])) == sorted(HOSTILE)       # verbatim, every query matched
    truth = tmp_path / "truth.csv"
    truth.write_text("query_id,gallery_id\n" + "".join(f"\"{q}\",\n" for q in HOSTILE))
    evaluate(str(out), str(truth), str(tmp_path / "out" / "eval"), config.load())
    report = tmp_path / "out" / "report"
    summary = build_report(str(out), str(report), config.load(sets=["report.thumbnails=files",
                                                                     "report.threshold=-1.0"]),
                           truth_url=str(truth))
    assert summary["counts"]["flagged_queries"] == len(HOSTILE)
    html = (report / "report.html").read_text()
    assert "<img src=x onerror" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    created = files_under(tmp_path) - before
    outside = [p for p in created if not p.startswith(str(tmp_path / "out"))
               and p not in (str(tmp_path / "truth.csv"), str(tmp_path / "out"))]
    assert created and not outside, outside
    assert not os.path.exists("/abs/escape") and not os.path.exists("/tmp/escape")
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path.parent.parent / "escape").exists()


@pytest.mark.parametrize("bad", ["../../outside.parquet", "/etc/passwd", "s3://other-bucket/x.parquet"])
def test_manifest_paths_cannot_leave_their_directory(world, tmp_path, bad):
    """A file name in a gallery, query, index or search manifest that escapes its directory is refused."""
    import shutil

    gal = str(tmp_path / "gallery")
    shutil.copytree(world["gallery"], gal)
    edit_manifest(gal, "_manifest.json", "shards", bad)
    with pytest.raises(fsio.UnsafePathError):
        build_index([gal], str(tmp_path / "idx"), INDEX)
    q = str(tmp_path / "queries")
    shutil.copytree(world["queries"], q)
    edit_manifest(q, "_manifest.json", "shards", bad)
    with pytest.raises(fsio.UnsafePathError):
        search(q, world["index"], str(tmp_path / "s1"), config.load())
    idx = str(tmp_path / "index")
    shutil.copytree(world["index"], idx)
    edit_manifest(idx, "_manifest.json", "shards", bad)
    with pytest.raises(fsio.UnsafePathError):
        search(world["queries"], idx, str(tmp_path / "s2"), config.load())
    out = str(tmp_path / "s3")
    search(world["queries"], world["index"], out, config.load())
    edit_manifest(out, "_manifest.json", "files", bad)
    with pytest.raises(fsio.UnsafePathError):
        read_results(out)
    assert not os.path.exists(tmp_path / "idx" / "_manifest.json")
    assert not os.path.exists(tmp_path / "s1" / "_manifest.json")
    assert not os.path.exists(tmp_path / "s2" / "_manifest.json")
