"""The gallery-major rerank's pieces (retrieval/search/blocks.py) on real Parquet feature files:
block planning, routing, the per-query top k kept by a block, and a block task against the
chunk-major rerank's scores."""
from __future__ import annotations

import numpy as np
import pytest

from tests import synthetic
from retrieval.index import idmap
from retrieval.search import blocks, rerank
from retrieval.search.vectors import VectorCache


@pytest.fixture(scope="module", params=["int8", "float32"])
def gallery(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    coarse, fine = synthetic.gallery(3000, synthetic.SyntheticSpec(n_clusters=50, seed=3))
    url = str(root / "g")
    synthetic.write_feature_output(url, coarse, fine, num_files=2, storage=request.param, row_group_size=200)
    files = sorted(str(p) for p in (root / "g").glob("*.parquet"))
    return files, fine


def test_blocks_pack_row_groups_up_to_the_budget_and_cover_every_row(gallery):
    files, _ = gallery
    cache = VectorCache(0)
    row = cache.footer(files[0]).row_bytes
    assert row in (512 + 4, 512 * 4)                           # int8 codes + a float32 scale, or float32
    plan = blocks.plan_blocks(cache, files, None, [1500, 1500], 3 * 200 * row)
    assert all(b.decoded_bytes <= 3 * 200 * row for b in plan)
    covered = [(s.file_no, r) for b in plan for s in b.segments for r in range(s.start, s.stop)]
    assert covered == [(f, r) for f in range(2) for r in range(1500)]      # each row once, in order
    assert len(plan) == 6 and len(plan[2].segments) == 2       # 8 groups per file: a block spans both
    one = blocks.plan_blocks(cache, files, None, None, 0)      # budget 0: one row group a block
    assert len(one) == 16
    with pytest.raises(ValueError, match="replaced or truncated"):
        blocks.plan_blocks(cache, files, None, [1500, 1499], 1 << 30)


def test_routing_splits_pairs_by_block_and_refuses_unknown_rows(gallery):
    files, _ = gallery
    row = VectorCache(0).footer(files[0]).row_bytes
    plan = blocks.plan_blocks(VectorCache(0), files, None, None, 3 * 200 * row)
    rng = np.random.default_rng(0)
    ids = idmap.encode_ids(rng.integers(0, 2, (40, 30)), rng.integers(0, 1500, (40, 30)))
    ids[0, :5] = -1
    coarse = rng.random((40, 30)).astype(np.float32)
    recs = list(blocks.route(7, ids, coarse, blocks.BlockMap(plan), {"x": 1}))
    *pairs, (meta_block, meta) = recs
    assert meta.meta == {"x": 1} and meta_block == 7 % len(plan) and len(meta.pos) == 0
    got = np.concatenate([r.pos for _, r in pairs])
    assert sorted(got.tolist()) == np.flatnonzero(ids.ravel() >= 0).tolist()   # every valid pair once
    for b, r in pairs:
        assert np.array_equal(ids.ravel()[r.pos], r.gid) and np.array_equal(coarse.ravel()[r.pos], r.coarse)
        f, rows = idmap.decode_ids(r.gid)
        assert all(any(s.file_no == fi and s.start <= ro < s.stop for s in plan[b].segments)
                   for fi, ro in zip(f, rows))
    bad = ids.copy()
    bad[1, 1] = idmap.encode_ids(1, np.array([1500]))[0]
    with pytest.raises(KeyError, match="row 1500 of feature file #1"):
        list(blocks.route(0, bad, coarse, blocks.BlockMap(plan), {}))


def test_keep_topk_keeps_each_querys_best_by_score_then_id():
    rng = np.random.default_rng(1)
    width, k = 50, 3
    pos = rng.permutation(20 * width)[:600].astype(np.int32)
    gid = rng.integers(0, 100, len(pos)).astype(np.int64)
    fine = rng.integers(0, 5, len(pos)).astype(np.float32)        # many ties
    keep = set(blocks.keep_topk(pos, gid, fine, width, k).tolist())
    for q in range(20):
        mine = [j for j in range(len(pos)) if pos[j] // width == q]
        best = sorted(mine, key=lambda j: (-fine[j], gid[j]))[:k]
        assert {j for j in keep if pos[j] // width == q} == set(best)


def test_block_task_scores_like_the_chunk_major_rerank(gallery):
    files, fine = gallery
    plan = blocks.plan_blocks(VectorCache(0), files, None, None, 2 * 200 * VectorCache(0).footer(files[0]).row_bytes)
    rng = np.random.default_rng(2)
    nq, width, k = 16, 40, 5
    q = rng.standard_normal((nq, 512)).astype(np.float32)
    ids = idmap.encode_ids(rng.integers(0, 2, (nq, width)), rng.integers(0, 1500, (nq, width)))
    coarse = rng.random((nq, width)).astype(np.float32)
    want_s, want_i, want_c = rerank.rerank(q, ids, coarse, files, k, cache=VectorCache(1 << 30))
    routed: dict[int, list] = {}
    for b, r in blocks.route(0, ids, coarse, blocks.BlockMap(plan), {"chunks": 1}):
        routed.setdefault(b, []).append(r)
    pieces = []
    for b in plan:
        out = list(blocks.block_task(b, routed.get(b.block, []), files, None, width, k,
                                     lambda c: (q, 0), 2, VectorCache(0)))
        stats = out[-1][1].meta["block"]
        assert stats["block"] == b.block and stats["pairs"] == sum(len(r.pos) for r in routed.get(b.block, [])
                                                                   if r.meta is None)
        assert stats["pairs_kept"] <= stats["pairs"]
        pieces += [p for _, p in out]
    s, i, c, chunk_meta, block_meta = blocks.assemble(pieces, nq, width)
    assert chunk_meta == [{"chunks": 1}] and len(block_meta) == len(plan)
    got_s, got_i, got_c = rerank.select(s, i, c, k)
    assert np.array_equal(got_i, want_i) and np.array_equal(got_s, want_s)
    assert np.array_equal(got_c, want_c, equal_nan=True)
    # each block's touched row groups were read once, decoded exactly
    assert sum(m["row_groups"] for m in block_meta) <= 16
