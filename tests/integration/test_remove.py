"""Takedowns (``retrieval remove``) and compaction (``retrieval index --compact``) on real Parquet,
faiss and Spark: removed ids are never returned from the moment the removal commits, compaction
drops them physically with the same search results, and the takedown list survives appends,
rebuilds and re-extraction (docs/lifecycle.md)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval import config, fsio, outputs
from retrieval.cli import main
from retrieval.index import store, takedowns
from retrieval.index.build import build_index
from retrieval.index.compact import compact
from retrieval.remove.job import remove
from retrieval.search import read_results, search
from tests import synthetic

SPEC = synthetic.SyntheticSpec(n_clusters=40, seed=5, copy_noise=0.2)
N_A, N_B, N_Q = 3000, 600, 120
SETS = ["index.vectors_per_shard=1000", "index.quality_queries=50", "index.tune_queries=200", "index.nlist=32",
        "search.nprobe=32", "search.shortlist=100", "search.shard_shortlist=100", "search.k=5"]


def cfg(*sets: str):
    return config.load(sets=[*SETS, *sets])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("remove")
    coarse, fine = synthetic.gallery(N_A + N_B, SPEC)
    synthetic.write_feature_output(str(root / "feat_a"), coarse[:N_A], fine[:N_A], num_files=3)
    synthetic.write_feature_output(str(root / "feat_b"), coarse[N_A:], fine[N_A:], num_files=1, start=N_A)
    qc, qf, src = synthetic.queries(N_A + N_B, N_Q, 0, SPEC)      # the same rows as gallery(N_A + N_B)
    synthetic.write_feature_output(str(root / "queries"), qc, qf, num_files=1, role="query", id_prefix="q")
    return {"root": root, "a": str(root / "feat_a"), "b": str(root / "feat_b"), "q": str(root / "queries"),
            "src": src[src < N_A]}


def ids_file(root, name: str, ids: list[str]) -> str:
    path = str(root / name)
    with open(path, "w") as fh:
        fh.write("\n".join(ids) + "\n")
    return path


def gid(i: int) -> str:
    return synthetic.image_id(i)


def results(data, index: str, name: str, engine=None, **sets) -> pa.Table:
    out = str(data["root"] / name)
    search(data["q"], index, out, cfg(*[f"{k}={v}" for k, v in sets.items()]), engine, overwrite=True)
    return read_results(out).sort_by([("query_id", "ascending"), ("rank", "ascending")])


def fresh_index(data, name: str, engine=None, features=("a",)) -> str:
    out = str(data["root"] / name)
    build_index([data[f] for f in features], out, cfg(), engine)
    return out


@pytest.fixture(scope="module")
def before(data):
    """An index of feat_a and its search results before any takedown."""
    index = fresh_index(data, "idx_before")
    return index, results(data, index, "res_before")


def test_remove_takes_effect_at_once_and_compaction_keeps_the_results(data, before):
    index0, res0 = before
    removed = sorted({gid(int(s)) for s in data["src"][:40]})          # sources of 40 queries: their top-1
    top1 = set(res0.filter(pa.compute.equal(res0.column("rank"), 1)).column("gallery_id").to_pylist())
    assert len(set(removed) & top1) >= 35
    index = fresh_index(data, "idx_remove")
    m = remove(index, ids_file(data["root"], "takedown.txt", removed + ["no-such-image"]), cfg())
    batch = m["takedowns"]["batches"][-1]
    assert batch["kind"] == "remove" and batch["requested"] == 41
    assert (batch["removed_ids"], batch["found"], batch["unknown"], batch["rows"]) == (41, 40, 1, 40)
    assert m["takedowns"]["tombstoned_rows"] == 40 and m["live"] == m["ntotal"] - 40 and batch["at"]
    assert outputs.read(index, "index")["takedowns"]["removed_ids"] == 41    # committed
    res = results(data, index, "res_removed")
    assert not set(res.column("gallery_id").to_pylist()) & set(removed)
    assert res.num_rows == res0.num_rows        # every query still gets k results
    # the other plans: a coarse task per shard (shuffled lists), gallery-major rerank: the same rows
    resg = results(data, index, "res_removed_g", **{"search.rerank": "gallery", "search.shard_cache": 1})
    assert resg.select(["query_id", "rank", "gallery_id"]).equals(res.select(["query_id", "rank", "gallery_id"]))
    # results of queries whose lists held no removed id are unchanged
    hit = set(res0.filter(pa.compute.is_in(res0.column("gallery_id"), pa.array(removed))).column("query_id")
              .to_pylist())
    keep0 = res0.filter(pa.compute.invert(pa.compute.is_in(res0.column("query_id"), pa.array(sorted(hit)))))
    keep1 = res.filter(pa.compute.invert(pa.compute.is_in(res.column("query_id"), pa.array(sorted(hit)))))
    assert keep0.select(["query_id", "gallery_id", "rank"]).equals(keep1.select(["query_id", "gallery_id", "rank"]))
    # removing again: counted as already removed, nothing changes
    again = remove(index, ids_file(data["root"], "again.txt", removed[:3]), cfg())["takedowns"]
    assert again["batches"][-1]["already_removed"] == 3 and again["tombstoned_rows"] == 40
    # compaction: rows dropped from shards and feature rows, the same results
    shards_before = {s["shard"]: s["file"] for s in outputs.read(index, "index")["shards"]}
    mc = compact(index, cfg())
    assert mc["ntotal"] == m["ntotal"] - 40 and mc["live"] == mc["ntotal"]
    assert mc["takedowns"]["tombstones"] is None and mc["takedowns"]["compacted_rows"] == 40
    assert mc["takedowns"]["batches"][-1]["kind"] == "compact"
    changed = [s for s in mc["shards"] if s["file"] != shards_before[s["shard"]]]
    assert changed and all(not os.path.exists(os.path.join(index, shards_before[s["shard"]])) for s in changed)
    for f in mc["feature_files"]:
        ids = pq.read_table(f["url"], columns=["image_id"]).column(0).to_pylist()
        assert len(ids) == f["rows"] and not set(ids) & set(removed)
    assert [n for n in os.listdir(os.path.join(index, "_takedowns")) if n.startswith("tombstones")] == []
    resc = results(data, index, "res_compacted")
    cols = ["query_id", "rank", "gallery_id"]
    assert resc.select(cols).equals(res.select(cols))
    np.testing.assert_allclose(resc.column("score").to_numpy(), res.column("score").to_numpy(), atol=1e-6)
    assert compact(index, cfg())["ntotal"] == mc["ntotal"]          # nothing left to compact


def one_row(data, name: str, row: int) -> str:
    """A feature output holding gallery row ``row`` again (the same image_id): a re-extraction."""
    coarse, fine = synthetic.gallery(N_A + N_B + 10, SPEC)
    url = str(data["root"] / name)
    synthetic.write_feature_output(url, coarse[row:row + 1], fine[row:row + 1], num_files=1, start=row)
    return url


@pytest.fixture(params=["local", "spark"])
def engine(request):
    """Each lifecycle case on both engines (None: the local engine)."""
    return request.getfixturevalue("spark") if request.param == "spark" else None


def test_append_rebuild_restore_and_a_re_added_id(data, engine):
    e = engine
    index = fresh_index(data, f"idx_life_{e is None}", e)
    build_index([data["b"]], index, cfg(), e, append=True)
    # remove after append: one id of the appended feat_b, one of feat_a
    gone_b, gone_a = gid(N_A + 7), gid(11)
    m = remove(index, ids_file(data["root"], "life1.txt", [gone_b, gone_a]), cfg(), e)
    assert m["takedowns"]["tombstoned_rows"] == 2 and m["live"] == N_A + N_B - 2
    # append after remove: gone_a extracted again (its old row, a tombstone, is its first occurrence)
    ma = build_index([one_row(data, "readd1", 11), one_row(data, "new1", N_A + N_B)], index, cfg(), e,
                     append=True)
    assert ma["builds"][-1]["added"] == 1 and ma["builds"][-1]["skipped"]["duplicates"] == 1
    mc = compact(index, cfg(), e)
    assert mc["live"] == mc["ntotal"] == N_A + N_B - 1
    # after compaction the old row is gone: the takedown list keeps the re-extracted one out
    ma = build_index([one_row(data, "readd2", 11), one_row(data, "new2", N_A + N_B + 1)], index, cfg(), e,
                     append=True)
    assert ma["builds"][-1]["skipped"]["removed"] == 1 and ma["builds"][-1]["added"] == 1
    res = results(data, index, "res_life", e)
    assert not {gone_a, gone_b} & set(res.column("gallery_id").to_pylist())
    # indexed again from scratch into the same directory: the list still applies
    mo = build_index([data["a"], data["b"]], index, cfg("index.mode=overwrite"), e)
    assert mo["skipped"]["removed"] == 2 and mo["takedowns"]["removed_ids"] == 2
    assert mo["takedowns"]["tombstones"] is None and mo["live"] == mo["ntotal"] == N_A + N_B - 2
    assert not {gone_a, gone_b} & set(results(data, index, "res_life2", e).column("gallery_id").to_pylist())
    # a re-added id: restore lifts the takedown; the rows the build left out return with the next rebuild
    mr = remove(index, ids_file(data["root"], "life2.txt", [gone_a, "unknown-x"]), cfg(), e, restore=True)
    batch = mr["takedowns"]["batches"][-1]
    assert (batch["restored_ids"], batch["not_removed"], mr["takedowns"]["removed_ids"]) == (1, 1, 1)
    mo = build_index([data["a"], data["b"]], index, cfg("index.mode=overwrite"), e)
    assert mo["skipped"]["removed"] == 1 and mo["live"] == N_A + N_B - 1
    coarse, _ = synthetic.gallery(N_A + N_B + 10, SPEC)
    _, found = store.search_shards(index, coarse[10:13], 50, nprobe=32)
    assert 11 in found[1] and 10 in found[0]           # file 0, row 11: gone_a is back


def test_restore_before_compaction_is_immediate(data, engine):
    index = fresh_index(data, f"idx_restore_{engine is None}", engine)
    victim = gid(int(data["src"][0]))
    remove(index, ids_file(data["root"], "r1.txt", [victim]), cfg(), engine)
    assert victim not in results(data, index, "res_r1", engine).column("gallery_id").to_pylist()
    mr = remove(index, ids_file(data["root"], "r1.txt", [victim]), cfg(), engine, restore=True)
    assert mr["takedowns"]["tombstones"] is None and mr["live"] == mr["ntotal"]
    assert victim in results(data, index, "res_r2", engine).column("gallery_id").to_pylist()


def test_a_remove_that_stopped_before_its_commit_is_completed_by_the_next(data, engine):
    """A run that wrote the takedown list and stopped before the manifest's commit (a crash): the
    same remove again tombstones the rows, though the list already names the ids."""
    index = fresh_index(data, f"idx_crash_{engine is None}", engine)
    victims = [gid(int(s)) for s in data["src"][:3]]
    m0 = store.read_index_manifest(index)
    listed = takedowns.read_list(index)
    takedowns.write_list(index, pa.concat_tables([listed, pa.table({
        "image_id": victims, "removed_at": ["2026-12-07T00:00:00Z"] * 3, "batch": pa.array([1] * 3, pa.int32())},
        schema=takedowns.LIST_SCHEMA)]))                  # what the stopped run left: the list, no commit
    assert store.read_index_manifest(index) == m0
    m = remove(index, ids_file(data["root"], "crash.txt", victims), cfg(), engine)
    batch = m["takedowns"]["batches"][-1]
    assert (batch["already_removed"], batch["rows"], batch["rows_in_shards"]) == (3, 3, 3)
    assert m["takedowns"]["tombstoned_rows"] == 3 and m["live"] == m["ntotal"] - 3
    assert not set(victims) & set(results(data, index, f"res_crash_{engine is None}", engine)
                                  .column("gallery_id").to_pylist())
    again = remove(index, ids_file(data["root"], "crash.txt", victims), cfg(), engine)   # nothing more to do
    assert again["takedowns"]["batches"][-1]["rows"] == 0 and again["takedowns"]["tombstoned_rows"] == 3


@pytest.mark.parametrize("kind", ["csv", "parquet", "empty", "bom", "bad"])
def test_id_files(data, tmp_path, kind):
    if kind == "csv":
        path = str(tmp_path / "ids.csv")
        open(path, "w").write("image_id,reason\nimg0000000001,legal\nimg0000000002,user\nimg0000000001,dup\n")
        assert takedowns.read_ids(path) == ["img0000000001", "img0000000002"]
    elif kind == "parquet":
        path = str(tmp_path / "ids.parquet")
        pq.write_table(pa.table({"image_id": ["a", "b", None]}), path)
        assert takedowns.read_ids(path) == ["a", "b"]
    elif kind == "empty":
        path = str(tmp_path / "ids.txt")
        open(path, "w").write("\n\n")
        assert takedowns.read_ids(path) == []
    elif kind == "bom":           # a text file saved by Windows' Notepad: a BOM, CRLF, non-ASCII ids
        path = str(tmp_path / "ids.txt")
        open(path, "wb").write("\ufeffimg0000000001\r\nphoto-é.jpg\r\n".encode("utf-8"))
        assert takedowns.read_ids(path) == ["img0000000001", "photo-é.jpg"]
    else:
        path = str(tmp_path / "ids.csv")
        open(path, "w").write("id\nx\n")
        with pytest.raises(takedowns.IdsInputError, match="no image_id column"):
            takedowns.read_ids(path)
        with pytest.raises(takedowns.IdsInputError, match="no such file"):
            takedowns.read_ids(str(tmp_path / "missing.txt"))


def test_remove_refuses_what_is_not_an_index_and_a_held_lease(data, tmp_path):
    ids = ids_file(data["root"], "x.txt", ["img0000000001"])
    with pytest.raises(outputs.OutputExistsError, match="not an index output"):
        remove(data["a"], ids, cfg())
    with pytest.raises(FileNotFoundError):
        remove(str(tmp_path / "nothing"), ids, cfg())
    index = fresh_index(data, "idx_leased")
    lease = outputs.Lease(fsio.join(index, outputs.LEASE), index, "index").acquire()
    try:
        with pytest.raises(outputs.LeaseHeldError):
            remove(index, ids, cfg())
    finally:
        lease.release()
    assert "takedowns" not in outputs.read(index, "index")


def test_spark_remove_and_compact_equal_local(data, before, spark):
    removed = sorted({gid(int(s)) for s in data["src"][40:60]})
    ids = ids_file(data["root"], "spark.txt", removed)
    local, on_spark = fresh_index(data, "idx_l"), fresh_index(data, "idx_s", spark)
    ml, ms = remove(local, ids, cfg()), remove(on_spark, ids, cfg(), spark)
    drop = ("at", "engine", "seconds", "ids")
    assert [{k: v for k, v in b.items() if k not in drop} for b in ml["takedowns"]["batches"]] == \
        [{k: v for k, v in b.items() if k not in drop} for b in ms["takedowns"]["batches"]]
    rl, rs = results(data, local, "res_l"), results(data, on_spark, "res_s", spark)
    assert rl.select(["query_id", "rank", "gallery_id"]).equals(rs.select(["query_id", "rank", "gallery_id"]))
    assert not set(removed) & set(rs.column("gallery_id").to_pylist())
    cl, cs = compact(local, cfg()), compact(on_spark, cfg(), spark)
    assert [s["sha256"] for s in cl["shards"]] == [s["sha256"] for s in cs["shards"]]
    assert [f["sha256"] for f in cl["feature_files"]] == [f["sha256"] for f in cs["feature_files"]]
    rc = results(data, on_spark, "res_sc", spark)
    assert rc.select(["query_id", "rank", "gallery_id"]).equals(rs.select(["query_id", "rank", "gallery_id"]))


def test_cli_remove_and_compact(data, capsys):
    index = fresh_index(data, "idx_cli")
    ids = ids_file(data["root"], "cli.txt", [gid(5), gid(6), "nope"])
    assert main(["remove", "--index", index, "--ids", ids, "--engine", "local"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["removed_ids"] == out["listed_ids"] == 3 and out["unknown"] == 1 and out["tombstoned_rows"] == 2
    assert out["kind"] == "remove" and out["at"] and out["live"] == N_A - 2
    assert main(["remove", "--index", index, "--ids", str(data["root"] / "missing.txt"), "--engine", "local"]) == 2
    err = capsys.readouterr().err
    assert "missing.txt: no such file" in err and "Traceback" not in err
    assert main(["index", "--output", index, "--engine", "local"]) == 2
    assert "--features is required" in capsys.readouterr().err
    assert main(["index", "--compact", "--output", index, "--engine", "local"]) == 0
    m = outputs.read(index, "index")
    assert m["takedowns"]["compacted_rows"] == 2 and m["live"] == m["ntotal"] == N_A - 2


def test_retrieval_run_searches_again_after_a_takedown(data, tmp_path):
    """The run recipe's search step is complete for the same inputs, until the index changes in place."""
    from retrieval.recipes.run import Runner

    index = fresh_index(data, "idx_run")
    runner = Runner(str(tmp_path / "run"), cfg(), None)

    def step():
        return runner.step("results", "search", [data["q"], index],
                           lambda url, c, replace: search(data["q"], index, url, c, None, overwrite=replace),
                           cfg(), deps=())
    step()
    assert runner.steps["results"]["skipped"] is False
    step()
    assert runner.steps["results"]["skipped"] is True
    victim = gid(int(data["src"][3]))
    assert victim in read_results(runner.url("results")).column("gallery_id").to_pylist()
    remove(index, ids_file(data["root"], "run.txt", [victim]), cfg())
    step()
    assert runner.steps["results"]["skipped"] is False
    assert victim not in read_results(runner.url("results")).column("gallery_id").to_pylist()


def test_python_api_remove_and_compact(data):
    from retrieval import api

    index = fresh_index(data, "idx_api")
    m = api.remove(index, ids_file(data["root"], "api.txt", [gid(1), gid(2)]), config=cfg())
    assert m["takedowns"]["tombstoned_rows"] == 2
    assert api.remove(index, ids_file(data["root"], "api2.txt", [gid(2)]), restore=True,
                      config=cfg())["takedowns"]["tombstoned_rows"] == 1
    mc = api.compact(index, config=cfg())
    assert mc["ntotal"] == N_A - 1 and mc["takedowns"]["compacted_rows"] == 1
