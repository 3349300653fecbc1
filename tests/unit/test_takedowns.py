"""The tombstone filter and the over-fetch rule of a search on an index with takedowns."""
from __future__ import annotations

import numpy as np

from retrieval.index import takedowns
from retrieval.search import coarse


def test_drop_removed_marks_only_removed_ids_empty():
    ids = np.array([[5, 9, -1, 12], [12, 3, 4, 9]], np.int64)
    scores = np.array([[0.9, 0.8, -np.inf, 0.5], [0.7, 0.6, 0.5, 0.4]], np.float32)
    n = takedowns.drop_removed(scores, ids, np.array([4, 9, 100], np.int64))
    assert n == 3
    assert ids.tolist() == [[5, -1, -1, 12], [12, 3, -1, -1]]
    assert np.isneginf(scores[0, 1]) and np.isneginf(scores[1, 3]) and scores[1, 1] == np.float32(0.6)
    assert takedowns.drop_removed(scores, ids, None) == 0
    assert takedowns.drop_removed(scores, ids, np.zeros(0, np.int64)) == 0


def test_filtered_shard_list_is_the_top_k_of_the_live_ids():
    rng = np.random.default_rng(0)
    n, k = 1000, 20
    scores = rng.random((8, n)).astype(np.float32)
    ids = np.tile(np.arange(n, dtype=np.int64), (8, 1))
    removed = np.sort(rng.choice(n, 30, replace=False))
    extra = coarse.overfetch(k, len(removed), n)
    assert extra == 30                          # up to 64 tombstones: all of them (exact)
    s, i = coarse.topk_rows(scores, ids, k + extra, ordered=True)
    takedowns.drop_removed(s, i, removed)
    s, i = coarse.topk_rows(s, i, k, ordered=True)
    live = np.where(np.isin(ids, removed), -1, ids)
    want_s, want_i = coarse.topk_rows(scores.copy(), live, k, ordered=True)
    assert (i == want_i).all() and not np.isin(i, removed).any()


def test_overfetch_rule():
    assert coarse.overfetch(200, 0, 10**6) == 0
    assert coarse.overfetch(200, 10, 10**6) == 10
    assert coarse.overfetch(200, 5000, 10**6) == 64                 # sparse: the floor
    assert coarse.overfetch(200, 100_000, 10**6) == 160             # 10%: 8 x 200 x 0.1
    assert coarse.overfetch(200, 10**6, 10**6) == 1600


def test_the_plan_has_a_takedown_line_that_grows_with_the_gallery():
    from retrieval.plan import Cluster, plan, render_plan

    small, big = plan(10**8, Cluster()), plan(10**9, Cluster())
    assert big["stages"]["remove"]["wall"] == __import__("pytest").approx(10 * small["stages"]["remove"]["wall"])
    assert "tombstones" in big["stages"]["remove"]["basis"] and "compaction" in big["stages"]["remove"]["basis"]
    assert "\nremove " in render_plan(big)
