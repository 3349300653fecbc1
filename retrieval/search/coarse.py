"""Coarse stage: search one index shard for a chunk of queries, and merge per-shard shortlists.

A shard is a faiss index over 128-d coarse codes whose ids are the gallery int64 ids
(:mod:`retrieval.index.idmap`). Each (shard x query chunk) is searched for the top ``k`` (the
shortlist size S, so the merge is exact: the global top-S of a query can come from one shard);
:func:`merge_shortlists` folds the per-shard lists into the global top-S per query.

Order is deterministic everywhere: higher score first, then the smaller gallery id, so a merged
shortlist does not depend on the order the shards were searched in (library vs Spark).
"""
from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# the shard cache: loaded once per (executor) process, least recently used evicted
_SHARDS: "OrderedDict[tuple, object]" = OrderedDict()
_LOCK = threading.Lock()


def cached_shard(key: tuple, load: Callable[[], object], capacity: int = 2):
    """The shard for ``key`` (e.g. (index_url, shard_no, sha256)), loading it with ``load()`` at
    most once per process while it stays among the ``capacity`` most recently used."""
    with _LOCK:
        if key in _SHARDS:
            _SHARDS.move_to_end(key)
            return _SHARDS[key]
    index = load()
    with _LOCK:
        _SHARDS[key] = index
        _SHARDS.move_to_end(key)
        while len(_SHARDS) > max(1, capacity):
            old, _ = _SHARDS.popitem(last=False)
            log.info("shard cache: evicted %s", old)
    return index


def clear_cache() -> None:
    with _LOCK:
        _SHARDS.clear()


def cache_keys() -> list[tuple]:
    with _LOCK:
        return list(_SHARDS)


# ---------------------------------------------------------------------------------------------
AUTO_SHORTLIST_BASE = 200        # S at N <= 1M
AUTO_SHORTLIST_EXPONENT = 0.7    # growth with N beyond 1M
AUTO_SHORTLIST_MAX = 2000        # cap: query_chunk 8192 x 2000 x 24 B = 393 MB of shortlist per task


def auto_shortlist(ntotal: int) -> int:
    """The default shortlist S for a gallery of ``ntotal`` vectors (``search.shortlist: 0``):
    ``200 x (N / 10^6)^0.7``, at least 200, rounded up to a multiple of 50, at most 2,000.

    Why it grows: a query's true source ranks behind every gallery item whose coarse code
    happens to lie closer to the query than the source's own (noisy, lossy) code does, and the
    number of such items grows with N. Measured on the synthetic benchmark gallery (fixed coarse
    noise, tests/bench): at 1M the source's rank-1 is kept equally at S = 200, 500 and 1000 (only
    nprobe limits it; S = 100 loses 0.5-1 point); at 10M S = 500 keeps 90.3% and S = 1050 100%.
    The rule passes through both (1M: 200, 10M: 1050). Beyond the measured range it is capped
    (2,000 from ~25M vectors on): every index shard returns its top S, so S multiplies the
    shuffle (queries x S x 12 B x shards) and a task's shortlist memory (query_chunk x S x 24 B);
    at a billion, measure and set ``search.shortlist`` (docs/billion.md)."""
    s = AUTO_SHORTLIST_BASE * (max(int(ntotal), 1) / 1e6) ** AUTO_SHORTLIST_EXPONENT
    return int(min(AUTO_SHORTLIST_MAX, max(AUTO_SHORTLIST_BASE, math.ceil(s / 50.0) * 50)))


def search_shard(index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)``, each ``nq x k``: the shard's top ``k`` by inner product (missing
    entries: id -1, score -inf). ``nprobe`` is set on the index beforehand."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    if len(xq) == 0 or index.ntotal == 0:
        return (np.full((len(xq), k), -np.inf, np.float32), np.full((len(xq), k), -1, np.int64))
    scores, ids = index.search(xq, k)
    scores = scores.astype(np.float32, copy=False)
    scores[ids < 0] = -np.inf
    return scores, ids.astype(np.int64, copy=False)


def topk_rows(scores: np.ndarray, ids: np.ndarray, k: int, ordered: bool = False,
              return_cols: bool = False):
    """Per row, the ``k`` best entries of ``scores``/``ids`` (``n x m``; id -1 = empty), ties at
    the k-th score broken by the smaller id, so the chosen SET is deterministic. Rows with fewer
    than ``k`` valid entries are padded with id -1 / score -inf. With ``ordered`` each row is
    sorted (score desc, id asc); otherwise the order inside a row is unspecified but repeatable.
    With ``return_cols`` also the column of each kept entry in the input (-1 for padding)."""
    n, m = scores.shape
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    if m > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(scores, part, axis=1)
        i = np.take_along_axis(ids, part, axis=1)
        cols = part
        # rows where entries tied with the k-th score were cut arbitrarily: redo them exactly
        kth = s.min(axis=1, keepdims=True)
        cut = np.nonzero(np.isfinite(kth[:, 0]) &
                         ((scores == kth).sum(axis=1) > (s == kth).sum(axis=1)))[0]
        if len(cut):                                    # all such rows in one vectorised sort
            o = np.lexsort((ids[cut], -scores[cut]), axis=-1)[:, :k]
            s[cut] = np.take_along_axis(scores[cut], o, axis=1)
            i[cut] = np.take_along_axis(ids[cut], o, axis=1)
            cols[cut] = o
    else:
        s = np.full((n, k), -np.inf, np.float32)
        i = np.full((n, k), -1, np.int64)
        s[:, :m], i[:, :m] = scores, ids
        cols = np.full((n, k), -1, np.int64)
        cols[:, :m] = np.arange(m)
    i = np.where(np.isfinite(s), i, -1)
    if ordered and n:
        o = _row_order(s, i)
        s, i, cols = (np.take_along_axis(a, o, axis=1) for a in (s, i, cols))
    if return_cols:
        return s, i, np.where(i >= 0, cols, -1)
    return s, i


def _row_order(s: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Per-row permutation sorting by score desc, then id asc (empty entries last)."""
    key_i = np.where(i >= 0, i, np.iinfo(np.int64).max)
    first = np.argsort(key_i, axis=1, kind="stable")
    second = np.argsort(-np.take_along_axis(s, first, axis=1), axis=1, kind="stable")
    return np.take_along_axis(first, second, axis=1)


def merge_shortlists(parts: Sequence[tuple[np.ndarray, np.ndarray]], shortlist: int,
                     threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fold per-shard ``(scores, ids)`` (same queries, same row order) into the global top
    ``shortlist`` per query; candidates scoring below ``threshold`` are dropped (id -1)."""
    if not parts:
        raise ValueError("merge_shortlists: no shard results")
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    if threshold is not None:
        ids = np.where(scores >= threshold, ids, -1)
    return topk_rows(scores, ids, shortlist)
