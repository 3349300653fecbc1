"""Task failures, reruns and crashes of the index build and the search (real Spark local[2,4],
real faiss, real Parquet): a task that raises or whose Python worker dies is retried by Spark and
the outputs equal those of a run without faults, row for row; a rerun gives the same rows; an
output left by a run killed midway is never taken as complete and the next run finishes it.
(Extraction: tests/integration/test_extract.py; index resume details: test_index_build.py.)"""
from __future__ import annotations

import json
import os
import shutil

import retrieval.index  # noqa: F401  (before faiss)
import faiss
import numpy as np
import pytest

from retrieval import config

from tests import synthetic
from retrieval.report.job import build_report
from retrieval.index import idmap, store
from retrieval.index.build import build_index
from retrieval.search import read_results, search

N, MATCH, NOMATCH = 3000, 120, 40
SPEC = synthetic.SyntheticSpec(n_clusters=100, seed=5)
INDEX_SETS = ["index.index_key=IVF32,PQ16x4", "index.vectors_per_shard=1000", "index.quality_queries=100",
              "index.batch_rows=250"]
SEARCH_SETS = {"search.query_chunk": 40, "search.shortlist": 50, "search.k": 5}


def index_cfg(*sets: str):
    return config.load(sets=[*INDEX_SETS, *sets])


def search_cfg(**sets):
    return config.load(sets=[f"{k}={v}" for k, v in {**SEARCH_SETS, **sets}.items()])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Gallery + query features, a reference index and reference search results (local engine,
    no faults)."""
    root = tmp_path_factory.mktemp("reliability")
    coarse, fine = synthetic.gallery(N, SPEC)
    gal = str(root / "gallery")
    synthetic.write_feature_output(gal, coarse, fine, num_files=3, row_group_size=256)
    qc, qf, source = synthetic.queries(N, MATCH, NOMATCH, SPEC)
    queries = str(root / "queries")
    synthetic.write_feature_output(queries, qc, qf, num_files=2, role="query", id_prefix="q")
    idx = str(root / "index")
    m = build_index([gal], idx, index_cfg(), engine=None)
    assert len(m["shards"]) == 3
    ref = str(root / "search_ref")
    sm = search(queries, idx, ref, search_cfg(), engine=None)
    assert sm["counts"]["chunks"] == 4
    return {"root": root, "gallery": gal, "queries": queries, "index": idx, "manifest": m,
            "search": ref, "rows": rows_of(ref), "xq": qc}


def rows_of(url) -> list[tuple]:
    t = read_results(str(url)).to_pydict()
    return list(zip(t["query_id"], t["rank"], t["gallery_id"], t["score"], t["coarse_score"]))


def all_ids(index_url: str, manifest: dict) -> np.ndarray:
    """Every id stored in the index's shards, read from the inverted lists themselves."""
    out = []
    for shard_no in range(len(manifest["shards"])):
        index = store.load_shard(index_url, shard_no, manifest)   # keep it alive while its lists are read
        ivf = faiss.extract_index_ivf(index)
        for lst in range(ivf.nlist):
            n = ivf.invlists.list_size(lst)
            if n:
                out.append(faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n).copy())
    return np.concatenate(out)


def markers(index_url: str, n: int) -> list[dict]:
    return [json.load(open(os.path.join(index_url, "_shards", f"shard-{i:05d}.json"))) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# task failures
@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_index_task_failure_mid_shard_is_retried_to_the_same_index(world, spark, tmp_path, kind, monkeypatch):
    ref = world["manifest"]
    idx = str(tmp_path / "idx")
    # shard 1 fails after 500 of its 1,000 vectors (2 batches of 250), on its first attempt only
    monkeypatch.setenv("RETRIEVAL_FAULTS", f"stage=index,task=1,kind={kind},after_items=500")
    m = build_index([world["gallery"]], idx, index_cfg(), engine=spark)
    assert [mk["attempt"] for mk in markers(idx, 3)] == [0, 1, 0]   # the fault fired, then Spark retried
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert m["trained"]["sha256"] == ref["trained"]["sha256"] and m["ntotal"] == N
    ids = np.sort(all_ids(idx, m))     # no vector missing, none twice
    expected = np.sort(np.concatenate([idmap.encode_ids(f["file_no"], np.arange(f["rows"]))
                                       for f in m["feature_files"]]))
    assert np.array_equal(ids, expected)
    got, want = store.search_shards(idx, world["xq"], 20), store.search_shards(world["index"], world["xq"], 20)
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])


@pytest.mark.parametrize("kind,rerank", [("raise", "chunk"), ("kill", "chunk"), ("kill", "gallery")])
def test_search_task_failure_is_retried_to_the_same_rows(world, spark, tmp_path, kind, rerank, monkeypatch):
    out = str(tmp_path / "search")
    # chunk 1's task fails on its first attempt after its rerank, before its part file is written
    # (gallery-major: the task that assembles chunk 1 from the blocks' shuffled output)
    monkeypatch.setenv("RETRIEVAL_FAULTS", f"stage=search,task=1,kind={kind},after_items=1")
    m = search(world["queries"], world["index"], out,
               search_cfg(**{"search.rerank": rerank, "search.vector_cache_mb": 1}), engine=spark)
    assert m["params"]["rerank"] == rerank and (m["params"]["blocks"] > 1) == (rerank == "gallery")
    assert [c["attempt"] for c in m["chunks"]] == [0, 1, 0, 0]
    rows = rows_of(out)
    assert rows == world["rows"]
    keys = [(q, r) for q, r, *_ in rows]
    assert len(keys) == len(set(keys))                     # no duplicate (query, rank)
    assert m["counts"]["queries"] == MATCH + NOMATCH and len(m["files"]) == 4
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------
# reruns
def test_reruns_give_the_same_index_and_rows(world, spark, tmp_path):
    idx = str(tmp_path / "idx")
    m = build_index([world["gallery"]], idx, index_cfg(), engine=spark)
    ref = world["manifest"]
    assert m["trained"]["sha256"] == ref["trained"]["sha256"]
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert m["quality"] == ref["quality"]
    out = str(tmp_path / "search")
    first = search(world["queries"], idx, out, search_cfg(), engine=spark)
    assert rows_of(out) == world["rows"]
    second = search(world["queries"], idx, out, search_cfg(), engine=None)   # again, into the same output
    assert rows_of(out) == world["rows"]
    assert [f["sha256"] for f in second["files"]] == [f["sha256"] for f in first["files"]]


# ---------------------------------------------------------------------------------------------
# crashes: what a run killed midway leaves behind
def test_search_killed_midway_is_not_complete_and_the_rerun_finishes_it(world, tmp_path):
    out = str(tmp_path / "search")
    shutil.copytree(world["search"], out)
    os.remove(os.path.join(out, "_manifest.json"))          # the manifest is written last
    os.remove(os.path.join(out, "part-00002.parquet"))
    with open(os.path.join(out, ".tmp-0a1b-part-00003.parquet"), "wb") as fh:
        fh.write(b"PAR1 half a file")
    with pytest.raises(FileNotFoundError, match="not a \\(complete\\) search output"):
        read_results(out)
    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        build_report(out, str(tmp_path / "report"), config.load())
    assert not os.path.exists(tmp_path / "report" / "summary.json")
    m = search(world["queries"], world["index"], out, search_cfg(), engine=None)
    assert rows_of(out) == world["rows"]
    assert sorted(n for n in os.listdir(out) if n.startswith("part-")) == [f["file"] for f in m["files"]]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_index_killed_before_its_manifest_is_refused_then_completed(world, tmp_path):
    idx = str(tmp_path / "idx")
    shutil.copytree(world["index"], idx)
    os.remove(os.path.join(idx, "_manifest.json"))
    os.remove(os.path.join(idx, "shard-00001.index"))
    with open(os.path.join(idx, ".tmp-9f9f-shard-00002.index"), "wb") as fh:
        fh.write(b"partial")
    with pytest.raises(FileNotFoundError, match="not a \\(complete\\) index"):
        search(world["queries"], idx, str(tmp_path / "search"), search_cfg(), engine=None)
    m = build_index([world["gallery"]], idx, index_cfg(), engine=None)
    assert m["builds"][-1]["shards_reused"] == 2            # shards 0 and 2 kept, shard 1 rebuilt
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in world["manifest"]["shards"]]
    assert not [n for n in os.listdir(idx) if n.startswith(".tmp-")]
    search(world["queries"], idx, str(tmp_path / "search"), search_cfg(), engine=None)
    assert rows_of(tmp_path / "search") == world["rows"]
