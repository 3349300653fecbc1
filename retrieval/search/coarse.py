"""Coarse stage: search one index shard for a chunk of queries, and merge per-shard shortlists.

A shard is a faiss index over 128-d coarse codes whose ids are the gallery int64 ids
(:mod:`retrieval.index.idmap`). All shards of an index share one trained quantizer, so the IVF
cells a query chunk probes are found once (:func:`assign`) and each shard only scans its lists
(:func:`search_shard`). Each shard returns its top K' (:func:`shard_shortlist`: S for an exact
merge, by default a binomial bound that keeps the merge exact with probability 1 - 1e-4);
:func:`merge_shortlists` folds the per-shard lists into the global top-S per query.

Order is deterministic everywhere: higher score first, then the smaller gallery id, so a merged
shortlist does not depend on the order the shards were searched in (library vs Spark).
"""
from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from retrieval.console import native_output

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# the shard cache: loaded once per (executor) process, least recently used evicted
_SHARDS: "OrderedDict[tuple, object]" = OrderedDict()
_LOCK = threading.Lock()


def lru_cached(cache: OrderedDict, key: tuple, compute: Callable[[], object],
               over: Callable[[OrderedDict], bool], what: str, log_level: int = logging.INFO):
    """``cache[key]``, computed with ``compute()`` at most once per process while it stays cached;
    least recently used entries are evicted while ``over(cache)`` (at least one is kept; each
    eviction logged at ``log_level``)."""
    with _LOCK:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = compute()
    with _LOCK:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > 1 and over(cache):
            old, _ = cache.popitem(last=False)
            log.log(log_level, "%s cache: evicted %s", what, old)
    return value


def cached_shard(key: tuple, load: Callable[[], object], capacity: int = 2):
    """The shard for ``key`` (e.g. (index_url, shard_no, sha256)), loading it with ``load()`` at
    most once per process while it stays among the ``capacity`` most recently used."""
    return lru_cached(_SHARDS, key, load, lambda c: len(c) > capacity, "shard")


def clear_cache() -> None:
    with _LOCK:
        _SHARDS.clear()
        _ASSIGNMENTS.clear()


def cache_keys() -> list[tuple]:
    with _LOCK:
        return list(_SHARDS)


_ASSIGNMENTS: "OrderedDict[tuple, Assignment]" = OrderedDict()
ASSIGNMENT_CACHE_BYTES = 64 << 20     # ~40 chunks of 8,192 queries at nprobe 16


def cached_assignment(key: tuple, compute: Callable[[], "Assignment"]) -> "Assignment":
    """The coarse assignment for ``key`` (index, trained part, query chunk, nprobe), computed at
    most once per process while it stays among the most recent ``ASSIGNMENT_CACHE_BYTES``: a
    process that searches several shards for the same chunk (in one task or in consecutive ones)
    searches the quantizer once."""
    return lru_cached(_ASSIGNMENTS, key, compute,
                   lambda c: sum(a.nbytes for a in c.values()) > ASSIGNMENT_CACHE_BYTES, "assignment")


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
    (2,000 from ~25M vectors on): S sets each shard's list K' (:func:`shard_shortlist`), so it
    grows the shuffle (queries x K' x 12 B x shards), and a task's shortlist memory
    (query_chunk x S x 24 B); at a billion, measure and set ``search.shortlist`` (docs/billion.md)."""
    s = AUTO_SHORTLIST_BASE * (max(int(ntotal), 1) / 1e6) ** AUTO_SHORTLIST_EXPONENT
    return int(min(AUTO_SHORTLIST_MAX, max(AUTO_SHORTLIST_BASE, math.ceil(s / 50.0) * 50)))


# ---------------------------------------------------------------------------------------------
# per-shard list length K'
SHARD_SHORTLIST_EPS = 1e-4     # auto K': chance per query that any shard held more of its top S


def _binomial_sf(n: int, p: float) -> np.ndarray:
    """``P(X > j)`` for ``j = 0..n``, ``X ~ Binomial(n, p)`` (log-space pmf, no scipy)."""
    j = np.arange(n + 1)
    lg = np.array([math.lgamma(v + 1.0) for v in range(n + 1)])
    logpmf = lg[n] - lg[j] - lg[n - j] + j * math.log(p) + (n - j) * math.log1p(-p)
    pmf = np.exp(logpmf - logpmf.max())
    pmf /= pmf.sum()
    return np.clip(1.0 - np.cumsum(pmf), 0.0, 1.0)


def shard_shortlist(shortlist: int, n_shards: int, configured: int | str = "auto",
                    eps: float = SHARD_SHORTLIST_EPS) -> int:
    """K', the candidates each index shard returns per query (``search.shard_shortlist``).

    ``configured > 0``: that many, at most ``shortlist`` (= ``shortlist``: the merge is exact:
    every shard returns enough to fill the global top S on its own). ``auto``: the smallest
    K' with ``n_shards x P(Binomial(S, 1/n_shards) > K') <= eps``. Shards are cut from the
    gallery in feature-file order, which says nothing about content, so the global top S of a
    query spreads over the shards like S draws with probability 1/n each: with K' from this rule
    a query's merged shortlist equals the exact one except with probability ``eps`` (1e-4), and
    then only its last entries (the lowest coarse scores) differ. 2 shards, S = 200: K' = 127;
    20 shards, S = 1,050: K' = 86 (a 12x smaller shuffle and heap)."""
    if configured != "auto" and configured > 0:
        return int(min(configured, shortlist))
    if n_shards <= 1:
        return int(shortlist)
    sf = _binomial_sf(int(shortlist), 1.0 / n_shards)
    ok = np.flatnonzero(n_shards * sf <= eps)
    return int(min(shortlist, ok[0] if len(ok) else shortlist))


OVERFETCH_MIN = 64        # a shard with tombstones returns up to this many extra candidates at least
OVERFETCH_DENSITY = 8     # ... or this many times the removed share of its top K'


def overfetch(k: int, removed_in_shard: int, shard_size: int) -> int:
    """Extra candidates a shard holding ``removed_in_shard`` tombstones (of ``shard_size`` vectors)
    returns, so that its K' best live ones survive the filter: ``min(removed, max(64, 8 x K' x
    removed / size))``. Exact whenever a query's top K' + extra in the shard holds at most that many
    removed items: always with up to 64 tombstones; beyond, unless removed items crowd a query's
    neighbourhood at more than 8x their share of the shard (then the query's list may be shorter:
    never a removed id). Compacting (``retrieval index --compact``) restores the plain search."""
    removed_in_shard = max(int(removed_in_shard), 0)
    density = math.ceil(OVERFETCH_DENSITY * k * removed_in_shard / max(int(shard_size), 1))
    return int(min(removed_in_shard, max(OVERFETCH_MIN, density)))


# ---------------------------------------------------------------------------------------------
# coarse assignment (the IVF cells a query probes) and the shard search
@dataclass(frozen=True)
class Assignment:
    """The ``nprobe`` IVF cells of each query (``cells``, ``cell_scores``: ``nq x nprobe``) and the
    queries as the IVF level sees them (``queries``: after any transform such as OPQ). Every shard of an
    index shares one trained quantizer, so one assignment serves all of them."""
    queries: np.ndarray
    cell_scores: np.ndarray
    cells: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.queries.nbytes + self.cell_scores.nbytes + self.cells.nbytes


def _ivf(index):
    """``(ivf, transform)``: the IVF level of a (possibly pre-transformed) index, and the function
    mapping queries into its space."""
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        chain = [index.chain.at(i) for i in range(index.chain.size())]

        def transform(x: np.ndarray) -> np.ndarray:
            for vt in chain:
                x = vt.apply(x)
            return x
        return faiss.downcast_index(index.index), transform
    return faiss.downcast_index(index), None


def assign(index, xq: np.ndarray) -> Assignment:
    """The coarse assignment of ``xq`` at ``index``'s nprobe (quantizer search, once per chunk)."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    ivf, transform = _ivf(index)
    xt = np.ascontiguousarray(transform(xq) if transform is not None and len(xq) else xq, dtype=np.float32)
    nprobe = int(ivf.nprobe)
    if len(xt) == 0:
        return Assignment(xt, np.zeros((0, nprobe), np.float32), np.zeros((0, nprobe), np.int64))
    with native_output("faiss"):
        scores, cells = ivf.quantizer.search(xt, nprobe)
    return Assignment(xt, scores, cells)


def search_shard(index, xq: np.ndarray | None, k: int, assignment: Assignment | None = None,
                 threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)``, each ``nq x k``: the shard's top ``k`` by inner product (missing
    entries: id -1, score -inf). ``nprobe`` is set on the index beforehand. With an
    ``assignment`` (:func:`assign`, made at the same nprobe, possibly on another shard of the same
    index) the quantizer is not searched again: the lists are scanned with faiss's
    ``search_preassigned``, in ``threads`` slices of the queries, each scanned by one thread
    (faiss releases the GIL), which is faster than faiss's own parallel loop for this call; ``xq``
    is then not needed (the assignment holds the queries)."""
    xq = assignment.queries if assignment is not None else np.ascontiguousarray(xq, dtype=np.float32)
    if len(xq) == 0 or index.ntotal == 0:
        return (np.full((len(xq), k), -np.inf, np.float32), np.full((len(xq), k), -1, np.int64))
    if assignment is None:
        with native_output("faiss"):
            scores, ids = index.search(xq, k)
    else:
        ivf, _ = _ivf(index)
        a = assignment
        if a.cells.shape != (len(xq), int(ivf.nprobe)):
            raise ValueError(f"assignment of shape {a.cells.shape} for {len(xq)} queries at nprobe {ivf.nprobe}")
        bounds = np.linspace(0, len(xq), max(1, min(threads, len(xq) // 64 or 1)) + 1).astype(int)

        def scan(part: int) -> tuple[np.ndarray, np.ndarray]:
            import faiss

            lo, hi = bounds[part], bounds[part + 1]
            if len(bounds) > 2:
                faiss.omp_set_num_threads(1)     # this (pool) thread's OpenMP setting only
            return ivf.search_preassigned(a.queries[lo:hi], k, a.cells[lo:hi], a.cell_scores[lo:hi])

        with native_output("faiss"):
            if len(bounds) == 2:
                scores, ids = scan(0)
            else:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(len(bounds) - 1) as pool:
                    parts = list(pool.map(scan, range(len(bounds) - 1)))
                scores, ids = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    scores = scores.astype(np.float32, copy=False)
    scores[ids < 0] = -np.inf
    return scores, ids.astype(np.int64, copy=False)


def topk_rows(scores: np.ndarray, ids: np.ndarray, k: int, ordered: bool = False,
              return_cols: bool = False):
    """Per row, the ``k`` best entries of ``scores``/``ids`` (``n x m``; id -1 or a non-finite
    score = empty), ties at the k-th score broken by the smaller id, so the chosen SET is
    deterministic (:func:`~retrieval.search.kernels.select_topk`). Rows with fewer than ``k``
    valid entries are padded with id -1 / score -inf. With ``ordered`` each row is sorted (score
    desc, id asc); otherwise the order inside a row is unspecified but repeatable. With
    ``return_cols`` also the column of each kept entry in the input (-1 for padding)."""
    from retrieval.search.kernels import select_topk

    s, i, cols = select_topk(scores, ids, k)
    if ordered and len(s):
        o = _row_order(s, i)
        s, i, cols = (np.take_along_axis(a, o, axis=1) for a in (s, i, cols))
    if return_cols:
        return s, i, cols
    return s, i


def _row_order(s: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Per-row permutation sorting by score desc, then id asc (empty entries last)."""
    key_i = np.where(i >= 0, i, np.iinfo(np.int64).max)
    first = np.argsort(key_i, axis=1, kind="stable")
    second = np.argsort(-np.take_along_axis(s, first, axis=1), axis=1, kind="stable")
    return np.take_along_axis(first, second, axis=1)


def merge_shortlists(parts: Sequence[tuple[np.ndarray, ...]], shortlist: int,
                     threshold: float | None = None) -> tuple[np.ndarray, ...]:
    """Fold per-shard ``(scores, ids)`` (same queries, same row order) into the global top
    ``shortlist`` per query; candidates scoring below ``threshold`` are dropped (id -1). Parts of
    three, ``(scores, ids, lists)``, carry each candidate's IVF list along: ``(scores, ids, lists)``
    (list -1 where the id is -1)."""
    if not parts:
        raise ValueError("merge_shortlists: no shard results")
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    if threshold is not None:
        ids = np.where(scores >= threshold, ids, -1)
    if len(parts[0]) < 3:
        return topk_rows(scores, ids, shortlist)
    s, i, cols = topk_rows(scores, ids, shortlist, return_cols=True)
    lists = np.take_along_axis(np.concatenate([p[2] for p in parts], axis=1), np.maximum(cols, 0), axis=1)
    return s, i, np.where(i >= 0, lists, -1).astype(np.int32)
