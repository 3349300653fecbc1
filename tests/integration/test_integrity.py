"""Integrity: every stage checks the files it reads against the sha256 that the manifest listing
them records. A truncated or altered feature shard, index file, query feature file, search result
file or model checkpoint is a clear error naming the file, raised before anything is written over
(the previous complete output stays as it was)."""
from __future__ import annotations

import os
import shutil
import time

import retrieval.index  # noqa: F401  (before faiss)
import pytest

from retrieval import config, fsio

from tests import synthetic
from retrieval.report.job import build_report
from retrieval.evaluate import evaluate
from retrieval.index.build import build_index
from retrieval.index.reader import FeatureInputError
from retrieval.integrity import IntegrityError
from retrieval.search import read_results, search

N = 1500
SPEC = synthetic.SyntheticSpec(n_clusters=50, seed=9)
INDEX = config.load(sets=["index.index_key=IVF16,PQ16x4", "index.vectors_per_shard=750",
                          "index.quality_queries=50"])
SEARCH = config.load(sets=["search.query_chunk=30", "search.shortlist=30", "search.k=3"])


def damage(path: str, how: str) -> None:
    """``truncate``: cut the file in half; ``flip``: change one byte in the middle (same size)."""
    if how == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    else:
        blob = bytearray(open(path, "rb").read())
        blob[len(blob) // 2] ^= 0x55
        open(path, "wb").write(bytes(blob))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    coarse, fine = synthetic.gallery(N, SPEC)
    gal = str(root / "gallery")
    synthetic.write_feature_output(gal, coarse, fine, num_files=2, row_group_size=256)
    qc, qf, _ = synthetic.queries(N, 45, 15, SPEC)
    queries = str(root / "queries")
    synthetic.write_feature_output(queries, qc, qf, num_files=2, role="query", id_prefix="q")
    idx = str(root / "index")
    build_index([gal], idx, INDEX)
    out = str(root / "search")
    search(queries, idx, out, SEARCH)
    return {"root": root, "gallery": gal, "queries": queries, "index": idx, "search": out}


def copy(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_feature_shard(world, tmp_path, how):
    """index build and search (gallery fine vectors for the rerank) both refuse it."""
    gal = copy(world["gallery"], tmp_path / "gallery")
    idx = str(tmp_path / "index")
    build_index([gal], idx, INDEX)
    out = copy(world["search"], tmp_path / "search")          # a complete earlier result
    before = read_results(out)
    damage(os.path.join(gal, "part-00001.parquet"), how)
    with pytest.raises(FeatureInputError, match="part-00001.parquet.*sha256"):
        build_index([gal], str(tmp_path / "index2"), INDEX)
    with pytest.raises(IntegrityError, match="gallery feature file .*gallery/part-00001.parquet.*sha256"):
        search(world["queries"], idx, out, SEARCH, overwrite=True)   # another index: an overwrite
    assert read_results(out).equals(before)                    # nothing lost
    with pytest.raises(IntegrityError, match="part-00001.parquet"):
        evaluate(world["search"], _truth(tmp_path), str(tmp_path / "eval"), SEARCH, exact_index=idx)


def _truth(tmp_path) -> str:
    p = tmp_path / "truth.csv"
    p.write_text("query_id,gallery_id\nq0000000000,img0000000001\n")
    return str(p)


@pytest.mark.parametrize("name", ["shard-00001.index", "trained.index"])
def test_index_file(world, spark, tmp_path, name):
    """search refuses it on both engines (checked on the driver, before any task runs), and so
    does an append to that index."""
    idx = copy(world["index"], tmp_path / "index")
    damage(os.path.join(idx, name), "flip")
    for engine in (None, spark):
        with pytest.raises(IntegrityError, match=f"index file .*{name}.*sha256"):
            search(world["queries"], idx, str(tmp_path / "out"), SEARCH, engine=engine)
    assert not os.path.exists(tmp_path / "out" / "_manifest.json")
    more = str(tmp_path / "more")
    c, f = synthetic.gallery(N + 300, SPEC)
    synthetic.write_feature_output(more, c[N:], f[N:], num_files=1, start=N)
    if name == "trained.index":
        with pytest.raises(ValueError, match="trained.index does not match the sha256"):
            build_index([more], idx, INDEX, append=True)


def test_query_feature_file(world, tmp_path):
    q = copy(world["queries"], tmp_path / "queries")
    damage(os.path.join(q, "part-00000.parquet"), "truncate")
    with pytest.raises(ValueError, match="query feature file .*part-00000.parquet.*sha256"):
        search(q, world["index"], str(tmp_path / "out"), SEARCH)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_search_result_file(world, tmp_path, how):
    """read_results, evaluate and the report refuse it."""
    out = copy(world["search"], tmp_path / "search")
    damage(os.path.join(out, "part-00001.parquet"), how)
    with pytest.raises(ValueError, match="result file .*part-00001.parquet.*sha256"):
        read_results(out)
    with pytest.raises(ValueError, match="result file .*part-00001.parquet.*sha256"):
        evaluate(out, _truth(tmp_path), str(tmp_path / "eval"), SEARCH)
    with pytest.raises(ValueError, match="result file .*part-00001.parquet.*sha256"):
        build_report(out, str(tmp_path / "report"), config.load())
    assert not os.path.exists(tmp_path / "report" / "summary.json")


def test_checkpoint(tmp_path):
    """a truncated checkpoint stops extraction (and so the query encoding of a search) with its name."""
    from PIL import Image

    from retrieval.extract.job import extract
    from retrieval.model.checkpoints import save_checkpoint
    from retrieval.model.network import ModelError, build_model

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(imgs / "a.jpg")
    ckpt = str(tmp_path / "model.pt")
    save_checkpoint(build_model(), ckpt)
    damage(ckpt, "truncate")
    cfg = config.load(sets=[f"model.checkpoint={ckpt}", "extract.num_shards=1"])
    with pytest.raises(ModelError, match="model.pt is corrupt"):
        extract(str(imgs), str(tmp_path / "out"), cfg)
    assert not os.path.exists(tmp_path / "out" / "_manifest.json")


def test_extraction_rerun_recomputes_an_altered_shard(tmp_path):
    """an incremental rerun does not take a damaged finished shard for done: it is recomputed."""
    from PIL import Image

    from retrieval.extract.job import extract, read_features

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 30), (60 * i, 200 - 40 * i, 90)).save(imgs / f"{i}.png")
    out = str(tmp_path / "out")
    cfg = config.load(sets=["extract.num_shards=2", "extract.storage=float32"])
    first = extract(str(imgs), out, cfg)
    damage(os.path.join(out, "part-00000.parquet"), "flip")
    with pytest.raises(ValueError, match="part-00000.parquet does not match the sha256"):
        read_features(out)
    again = extract(str(imgs), out, cfg)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
    assert fsio.sha256_file(os.path.join(out, "part-00000.parquet")) == first["shards"][0]["sha256"]
    assert read_features(out).num_rows == 4


def _age(*folders: str, seconds: float = 60.0) -> None:
    """Every file under ``folders`` last modified ``seconds`` ago (as an index made earlier)."""
    t = time.time() - seconds
    for folder in folders:
        for root, _, names in os.walk(folder):
            for n in names:
                os.utime(os.path.join(root, n), (t, t))


@pytest.mark.parametrize("engine", ["local", "spark"])
def test_verified_once(world, spark, tmp_path, engine):
    """With a verified-once record, unchanged index and gallery files are hashed once, not every run;
    a file altered since (same size) is hashed again and refused; a file modified within
    RACY_SECONDS of its check is not recorded (a same-tick write could keep its mtime)."""
    from retrieval.index.store import read_index_manifest
    from retrieval.integrity import record_path
    from retrieval.search.job import verify_index_inputs

    eng = spark if engine == "spark" else None
    gal = copy(world["gallery"], tmp_path / "gallery")
    idx = str(tmp_path / "index")
    build_index([gal], idx, INDEX)
    man = read_index_manifest(idx)
    n_files = 1 + 2 * len(man["shards"]) + len(man["feature_files"])     # each shard + its list-ordered fine copy
    rec = str(tmp_path / "verified.json")
    _age(gal, idx, seconds=-30.0)       # every file modified "now" for each check below, however slow
    assert verify_index_inputs(idx, man, eng, record=rec) == n_files
    assert verify_index_inputs(idx, man, eng, record=rec) == n_files      # just written: racy, not recorded
    _age(gal, idx)
    assert verify_index_inputs(idx, man, eng, record=rec) == n_files
    assert verify_index_inputs(idx, man, eng, record=rec) == 0            # unchanged: nothing hashed
    assert verify_index_inputs(idx, man, eng) == n_files                  # no record: every file
    damage(os.path.join(gal, "part-00001.parquet"), "flip")               # same size, new mtime
    cfg = SEARCH.with_overrides({"io.verified_record": rec})
    with pytest.raises(IntegrityError, match="gallery feature file .*part-00001.parquet.*sha256"):
        search(world["queries"], idx, str(tmp_path / "out"), cfg, engine=eng)
    with pytest.raises(IntegrityError, match="part-00001.parquet"):      # and again: never recorded
        verify_index_inputs(idx, man, eng, record=rec)
    damage(os.path.join(idx, "shard-00001.index"), "flip")
    os.remove(os.path.join(gal, "part-00001.parquet"))
    shutil.copy2(os.path.join(world["gallery"], "part-00001.parquet"), os.path.join(gal, "part-00001.parquet"))
    with pytest.raises(IntegrityError, match="index file .*shard-00001.index.*sha256"):
        verify_index_inputs(idx, man, eng, record=rec)
    assert record_path("none") is None and record_path(rec) == rec
