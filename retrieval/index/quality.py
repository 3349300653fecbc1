"""Build-time quality: the built index against EXACT search over all gallery vectors.

Queries: ``quality_queries`` vectors of the training sample (uniform over the gallery, their
"sources") plus noise, ``q = normalise(x + noise * g / sqrt(d))``: with ``quality_noise``
(small: cos(q, x) ~ 0.9) for the recall figures, and ``tune_queries`` (10,000; the first
``quality_queries`` sources are shared) with ``tune_noise`` (copies as far from their source as
cos ~ 0.7) for tuning nprobe, which needs no exact search, only the cell of each source. Each shard task contributes, for the first set,
the exact top-k over its own vectors (with the IVF cell of each hit) and its approximate top-k
at every nprobe of the tuning grid, and the cell of every source it holds; :meth:`Partial.merge`
folds two partial results into one (associative and order-free: ties are broken by the smaller
id), so Spark can tree-reduce them and the driver never holds more than a couple. From the
merged result:

- ``recall@10`` / ``recall@100``: share of the exact top-10 / top-100 that the index returns in
  its top-10 / top-100 (the usual k-NN intersection measure), per nprobe;
- ``cell_recall@10``: share of the exact top-10 that lie in the query's ``nprobe`` nearest cells
  (what the 500-long shortlist needs: inside a probed cell, a true neighbour survives the PQ
  ranking into the top 500 almost always; measured);
- ``source_hit@10`` / ``@100``: the query's own gallery vector is in the index's top-10 / 100;
- ``source_cell_recall``: share of the tuning queries (hard copies) whose source lies in one of
  their ``nprobe`` nearest cells: a source outside the probed cells can never reach the shortlist,
  one inside reaches the top 500 (PQ8, PQ16 and PQ32 gave the same top-500 hit rate, measured);
- the default ``nprobe``: the smallest of the grid with ``source_cell_recall >= target_recall``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

from retrieval.console import native_output

K = 100


def pick_sources(n_sample: int, n: int, seed: int) -> np.ndarray:
    """Positions in the training sample of the quality queries' sources."""
    n = min(n, n_sample)
    rng = np.random.default_rng([seed, 7])
    return np.sort(rng.choice(n_sample, size=n, replace=False)) if n else np.zeros(0, np.int64)


def make_queries(x: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """``normalise(x + noise * g / sqrt(d))`` with Gaussian ``g`` (seeded by ``seed`` and ``noise``)."""
    x = np.array(x, dtype=np.float32)
    if len(x):
        rng = np.random.default_rng([seed, 8, int(round(noise * 1000))])
        x += noise * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(x.shape[1])
        x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def _topk(scores: np.ndarray, ids: np.ndarray, k: int, extra: np.ndarray | None = None):
    """Per row the k best (score desc, then id asc; id -1 = empty, last)."""
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    key = np.where(ids >= 0, ids, np.iinfo(np.int64).max)
    order = np.lexsort((key, -scores), axis=-1)[:, :k]
    s = np.take_along_axis(scores, order, axis=1)
    i = np.take_along_axis(ids, order, axis=1)
    e = np.take_along_axis(extra, order, axis=1) if extra is not None else None
    if s.shape[1] < k:
        pad = k - s.shape[1]
        s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
        e = np.pad(e, ((0, 0), (0, pad)), constant_values=-1) if e is not None else None
    return s, i, e


@dataclass
class Exact:
    scores: np.ndarray
    ids: np.ndarray
    cells: np.ndarray | None = None

    def merge_exact(self, other: "Exact", k: int) -> "Exact":
        cells = None
        if self.cells is not None and other.cells is not None:
            cells = np.concatenate([self.cells, other.cells], axis=1)
        s, i, c = _topk(np.concatenate([self.scores, other.scores], axis=1),
                        np.concatenate([self.ids, other.ids], axis=1), k, cells)
        return Exact(s, i, c)

    def with_cells(self, cells: np.ndarray) -> "Exact":
        return Exact(self.scores, self.ids, cells)


def exact_topk(q: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int) -> Exact:
    """Exact inner-product top-k of ``q`` over the rows ``x`` (their index ids ``ids``)."""
    kk = min(k, len(x))
    with native_output("faiss"):
        d, i = faiss.knn(q, np.ascontiguousarray(x), kk, metric=faiss.METRIC_INNER_PRODUCT)
    gid = np.where(i >= 0, ids[np.clip(i, 0, None)], -1)
    s, g, _ = _topk(d, gid, k)
    return Exact(s, g)


def cell_of_ids(ivf: faiss.IndexIVF, ids: np.ndarray) -> np.ndarray:
    """The inverted list holding each id (-1 where absent), read from the lists themselves."""
    from faiss.contrib.inspect_tools import get_invlist

    all_ids, all_cells = [], []
    invlists = ivf.invlists
    for lst in range(ivf.nlist):
        if invlists.list_size(lst):
            lids, _ = get_invlist(invlists, lst)
            all_ids.append(lids.copy())
            all_cells.append(np.full(len(lids), lst, np.int64))
    out = np.full(ids.shape, -1, np.int64)
    if not all_ids:
        return out
    a = np.concatenate(all_ids)
    c = np.concatenate(all_cells)
    o = np.argsort(a)
    a, c = a[o], c[o]
    flat = ids.reshape(-1)
    pos = np.clip(np.searchsorted(a, flat), 0, len(a) - 1)
    found = (a[pos] == flat) & (flat >= 0)
    out.reshape(-1)[found] = c[pos[found]]
    return out


@dataclass
class Partial:
    n_queries: int
    k: int
    exact: Exact | None = None
    approx: dict = field(default_factory=dict)  # nprobe -> (scores, ids)
    source_cells: np.ndarray | None = None      # cell of each query's source (-1: not in this part)

    @classmethod
    def from_shard(cls, exact: Exact | None, approx: dict, n_queries: int, k: int,
                   source_cells: np.ndarray | None = None) -> "Partial":
        out = {}
        for nprobe, (d, i) in approx.items():
            s, g, _ = _topk(d, i.astype(np.int64), k)
            out[nprobe] = (s, g)
        return cls(n_queries, k, exact, out, source_cells)

    def merge(self, other: "Partial") -> "Partial":
        if self.exact is None:
            exact = other.exact
        elif other.exact is None:
            exact = self.exact
        else:
            exact = self.exact.merge_exact(other.exact, self.k)
        approx = {}
        for nprobe in sorted(set(self.approx) | set(other.approx)):
            parts = [p.approx[nprobe] for p in (self, other) if nprobe in p.approx]
            s, i, _ = _topk(np.concatenate([p[0] for p in parts], axis=1),
                            np.concatenate([p[1] for p in parts], axis=1), self.k)
            approx[nprobe] = (s, i)
        if self.source_cells is None or other.source_cells is None:
            cells = self.source_cells if other.source_cells is None else other.source_cells
        else:
            cells = np.maximum(self.source_cells, other.source_cells)
        return Partial(self.n_queries, self.k, exact, approx, cells)


def _intersection(a: np.ndarray, b: np.ndarray, k: int) -> float:
    hits = [len(np.intersect1d(a[r, :k][a[r, :k] >= 0], b[r, :k])) for r in range(len(a))]
    denom = sum(int((a[r, :k] >= 0).sum()) for r in range(len(a)))
    return float(sum(hits) / denom) if denom else 1.0


def query_cells(trained: faiss.Index, q: np.ndarray, nprobe: int) -> np.ndarray:
    """The ``nprobe`` nearest cells of each query (after the index's pre-transform, if any)."""
    x = q
    if isinstance(trained, faiss.IndexPreTransform):
        x = trained.apply_chain(len(q), faiss.swig_ptr(np.ascontiguousarray(q)))
        x = faiss.rev_swig_ptr(x, len(q) * trained.index.d).reshape(len(q), -1).copy()
    ivf = faiss.extract_index_ivf(trained)
    with native_output("faiss"):
        _, cells = ivf.quantizer.search(np.ascontiguousarray(x, dtype=np.float32), min(nprobe, ivf.nlist))
    return cells


def metrics(partial: Partial, trained: faiss.Index, queries: np.ndarray, tune_queries: np.ndarray,
            source_ids: np.ndarray, target_recall: float) -> dict:
    """Recall figures per nprobe and the tuned nprobe (module docstring). ``source_ids`` are the
    sources of ``tune_queries``; the first ``len(queries)`` are also those of ``queries``."""
    grid = sorted(partial.approx)
    e = partial.exact
    if e is None or not grid or not len(queries):
        return {"queries": 0}
    cells = query_cells(trained, queries, max(grid))
    tune_cells = query_cells(trained, tune_queries, max(grid))
    src = partial.source_cells[:len(tune_queries)] if partial.source_cells is not None else None
    indexed = src >= 0 if src is not None else np.zeros(len(tune_queries), bool)
    by_nprobe = []
    tuned = None
    qsrc = source_ids[:len(queries)]
    for nprobe in grid:
        _, a = partial.approx[nprobe]
        top = cells[:, :nprobe]
        valid = e.ids[:, :10] >= 0
        in_cell = np.array([np.isin(e.cells[r, :10], top[r]) for r in range(len(top))]) & valid
        src_in = (tune_cells[:, :nprobe] == src[:, None]).any(axis=1) & indexed if src is not None else indexed
        row = {
            "recall@10": round(_intersection(e.ids, a, 10), 4),
            "recall@100": round(_intersection(e.ids, a, min(100, partial.k)), 4),
            "cell_recall@10": round(float(in_cell.sum() / max(valid.sum(), 1)), 4),
            "source_hit@10": round(float((a[:, :10] == qsrc[:, None]).any(axis=1).mean()), 4),
            "source_hit@100": round(float((a == qsrc[:, None]).any(axis=1).mean()), 4),
            "source_cell_recall": round(float(src_in.sum() / max(indexed.sum(), 1)), 4),
        }
        by_nprobe.append({"nprobe": int(nprobe), **row})
        if tuned is None and row["source_cell_recall"] >= target_recall:
            tuned = nprobe
    if tuned is None:
        tuned = grid[-1]
    return {"queries": int(len(queries)), "tune_queries": int(len(tune_queries)), "k": partial.k,
            "tuned_nprobe": int(tuned), "target_recall": target_recall, "by_nprobe": by_nprobe}
