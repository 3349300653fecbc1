"""The gallery-major rerank over the index's list-ordered fine copy (``index.fine_by_list``,
``search.fine_layout``): the same result rows as the feature-file blocks and the chunk-major rerank,
on both engines, with query regions, takedowns, compaction and appends; each query row's vector
goes only to the blocks its shortlist touches; an index without the copy falls back."""
from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from retrieval import config, fsio
from retrieval.index import store
from retrieval.index.build import build_index
from retrieval.index.compact import compact
from retrieval.remove.job import remove
from retrieval.search import read_results, search
from tests import synthetic

N, MATCH, NOMATCH = 6000, 120, 80
SPEC = synthetic.SyntheticSpec(n_clusters=300, seed=5)
INDEX = ["index.index_key=IVF128,PQ16x4", "index.vectors_per_shard=2000", "index.quality_queries=50",
         "index.tune_queries=200"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bylist")
    g_coarse, g_fine = synthetic.gallery(N, SPEC)
    synthetic.write_feature_output(str(root / "gal_a"), g_coarse[:4500], g_fine[:4500], num_files=3,
                                   row_group_size=256)
    synthetic.write_feature_output(str(root / "gal_b"), g_coarse[4500:], g_fine[4500:], num_files=1,
                                   row_group_size=256, start=4500)
    qc, qfine, _ = synthetic.queries(4500, MATCH, NOMATCH, SPEC)
    # query regions: every other image gets a region row (a noisier copy of its whole-image row)
    rng = np.random.default_rng(3)
    rows_c, rows_f, regions = [], [], []
    for i in range(len(qc)):
        rows_c.append(qc[i])
        rows_f.append(qfine[i])
        regions.append(None)
        if i % 2 == 0:
            rows_c.append(qc[i] + 0.05 * rng.standard_normal(qc.shape[1]).astype(np.float32))
            rows_f.append(qfine[i] + 0.05 * rng.standard_normal(qfine.shape[1]).astype(np.float32))
            regions.append("center70:0.15,0.15,0.85,0.85")
    qf = str(root / "queries")
    synthetic.write_feature_output(qf, np.array(rows_c, np.float32), np.array(rows_f, np.float32), num_files=2,
                                   role="query", id_prefix="q", regions=regions)
    return {"root": root, "a": str(root / "gal_a"), "b": str(root / "gal_b"), "q": qf, "query_rows": len(rows_c)}


def _cfg(*extra: str):
    return config.load(sets=["search.query_chunk=64", "search.shortlist=100", "search.k=5", "search.nprobe=4",
                             "search.vector_cache_mb=0", *extra])


def _rows(url) -> list[tuple]:
    t = read_results(str(url)).sort_by([("query_id", "ascending"), ("rank", "ascending")]).to_pydict()
    return list(zip(t["query_id"], t["rank"], t["gallery_id"], t["score"], t["coarse_score"], t["gallery_uri"],
                    t["query_region"]))


@pytest.fixture(params=["local", "spark"])
def engine(request):
    return request.getfixturevalue("spark") if request.param == "spark" else None


def _search(world, index, name, engine=None, *sets):
    out = str(world["root"] / name)
    return search(world["q"], index, out, _cfg(*sets), engine, overwrite=True), _rows(out)


def test_list_blocks_give_the_same_rows_and_send_each_query_to_few_blocks(world, engine, tmp_path):
    index = str(tmp_path / "idx")
    m = build_index([world["a"]], index, config.load(sets=INDEX), engine)
    assert all(s["fine_by_list"]["rows"] == s["ntotal"] for s in m["shards"])
    for s in m["shards"]:
        t = fsio.read_parquet(fsio.join(index, s["fine_by_list"]["file"]))
        lst, ids = t.column("list").to_numpy(), t.column("id").to_numpy()
        assert (np.diff(lst) >= 0).all() and t.column_names == ["list", "id", "fine", "fine_scale"]
        assert all((np.diff(ids[lst == v]) > 0).all() for v in np.unique(lst))      # (list, id) order
    # written in passes of a few lists each (bounded task memory): the same rows
    from retrieval.index import finecopy
    shard = store.load_shard(index, 0, m)           # kept referenced while its IVF is used
    ivf = faiss.extract_index_ivf(shard)
    segs = [(f, m["feature_files"][f]["url"], a, b) for f, a, b in m["shards"][0]["segments"]]
    small = finecopy.write_copy(str(tmp_path / "small"), 0, ivf, segs, budget=64 * 516)
    whole = fsio.read_parquet(fsio.join(index, m["shards"][0]["fine_by_list"]["file"]))
    passes = fsio.parquet_file(str(tmp_path / "small" / small["file"]))
    assert passes.metadata.num_row_groups > fsio.parquet_file(
        fsio.join(index, m["shards"][0]["fine_by_list"]["file"])).metadata.num_row_groups
    assert passes.read().equals(whole) and small["rows"] == whole.num_rows
    new, rows_new = _search(world, index, f"new-{bool(engine)}", engine)
    old, rows_old = _search(world, index, f"old-{bool(engine)}", engine, "search.fine_layout=files")
    chunk, rows_chunk = _search(world, index, f"chunk-{bool(engine)}", engine, "search.rerank=chunk")
    assert new["params"]["rerank"] == old["params"]["rerank"] == "gallery"
    assert new["params"]["fine_by_list"] and not old["params"]["fine_by_list"]
    assert new["io"]["gallery_fine_layout"] == "lists" and old["io"]["gallery_fine_layout"] == "files"
    assert rows_new and rows_new == rows_old == rows_chunk
    assert {r[6] for r in rows_new} >= {None, "center70:0.15,0.15,0.85,0.85"}     # regions merged as before
    assert new["counts"] == old["counts"] and new["counts"]["query_rows"] == world["query_rows"]
    io = new["io"]
    # one block per IVF list here (vector_cache_mb 0): a query row's vector goes to <= nprobe blocks
    assert new["params"]["blocks"] >= 100 and io["pairs_scored"] == old["io"]["pairs_scored"]
    q_bytes = io["query_fine_bytes_read"]                     # each chunk's query vectors read once
    assert 0 < q_bytes and io["query_fine_bytes_shuffled"] <= 4 * q_bytes * 1.05
    # each block reads the copies' row groups of its lists: a group is read again only at a block edge
    groups = sum(fsio.parquet_file(fsio.join(index, s["fine_by_list"]["file"])).metadata.num_row_groups
                 for s in m["shards"])
    assert groups <= io["gallery_fine_row_groups_read"] <= groups + 2 * new["params"]["blocks"] * len(m["shards"])
    big, rows_big = _search(world, index, f"big-{bool(engine)}", engine, "search.vector_cache_mb=1",
                            "search.fine_layout=lists")
    assert rows_big == rows_new and big["io"]["gallery_fine_layout"] == "lists" and big["params"]["blocks"] >= 2
    # auto: no more feature-file blocks than nprobe (4) -> the feature files (routing would save little)
    few, rows_few = _search(world, index, f"few-{bool(engine)}", engine, "search.vector_cache_mb=1",
                            "search.rerank=gallery")
    assert rows_few == rows_new and few["params"]["rerank"] == "gallery"
    assert 2 <= few["params"]["blocks"] <= 4 and few["io"]["gallery_fine_layout"] == "files"


def test_takedowns_compaction_and_appends_keep_the_copy_in_step(world, engine, tmp_path):
    index = str(tmp_path / "idx")
    build_index([world["a"]], index, config.load(sets=INDEX))
    _, before = _search(world, index, "tb-before", engine)
    gone = sorted({r[2] for r in before if r[1] == 1})[:5]
    ids = tmp_path / "gone.txt"
    ids.write_text("\n".join(gone) + "\n")
    remove(index, str(ids), config.load(sets=[]))
    m_new, after = _search(world, index, "tb-new", engine)
    _, after_files = _search(world, index, "tb-files", engine, "search.fine_layout=files")
    assert m_new["params"]["fine_by_list"] and after == after_files
    assert not {r[2] for r in after} & set(gone) and len(after) > 0
    m = compact(index, config.load(sets=[]))
    rebuilt = [s for s in m["shards"] if s["file"].startswith("compact-")]
    assert rebuilt and all(s["fine_by_list"]["file"].startswith("compact-001/") for s in rebuilt)
    assert all(os.path.exists(os.path.join(index, s["fine_by_list"]["file"])) for s in m["shards"])
    assert not any(os.path.exists(os.path.join(index, f"shard-{s['shard']:05d}.fine.parquet")) for s in rebuilt)
    _, compacted = _search(world, index, "tb-compact", engine)
    assert compacted == after
    m = build_index([world["b"]], index, config.load(sets=INDEX), append=True)
    assert all(s.get("fine_by_list") for s in m["shards"]) and len(m["shards"]) == 4
    m_app, appended = _search(world, index, "tb-append", engine)
    _, appended_files = _search(world, index, "tb-append-files", engine, "search.fine_layout=files")
    assert m_app["params"]["fine_by_list"] and appended == appended_files
    assert {r[2] for r in appended} - {r[2] for r in after}          # the appended rows are found too


def test_an_index_without_the_copy_falls_back_to_the_feature_files(world, tmp_path, caplog):
    index = str(tmp_path / "idx")
    m = build_index([world["a"]], index, config.load(sets=[*INDEX, "index.fine_by_list=false"]))
    assert not any("fine_by_list" in s for s in m["shards"])
    assert not [p for p in os.listdir(index) if p.endswith(".fine.parquet")]
    with caplog.at_level("INFO", logger="retrieval.search.job"):
        res, rows = _search(world, index, "fb", None)
    assert not res["params"]["fine_by_list"] and res["io"]["gallery_fine_layout"] == "files" and rows
    assert "no list-ordered fine copy" in caplog.text
    with pytest.raises(ValueError, match="no list-ordered fine copy"):
        _search(world, index, "fb-lists", None, "search.fine_layout=lists")
    # the copy is written when the index is built again with it on (the same shards)
    m2 = build_index([world["a"]], index, config.load(sets=[*INDEX, "index.mode=overwrite"]))
    assert all(s.get("fine_by_list") for s in m2["shards"])
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m["shards"]]
    res2, rows2 = _search(world, index, "fb-2", None)
    assert res2["params"]["fine_by_list"] and rows2 == rows
    assert store.read_index_manifest(index)["shards"][0]["fine_by_list"]["file"] == "shard-00000.fine.parquet"
