"""Query regions in the search (``extract.query_regions``; docs/search.md "Query regions").

Query features extracted with regions hold several rows per query image: its whole-image row
(``region`` null) first, then one row per region (:mod:`retrieval.extract.regions`). The search
treats every row as a query of its own - its coarse code searched, its shortlist reranked with
its own fine descriptor, its scores normalised against the background with its own background
level - and then :func:`merge` folds the rows of each image into one list: per gallery image the
best score over the image's rows (``norm_score`` when the search normalises: a region's raw cosine
is not comparable with the whole image's, its normalised score is), the top ``k`` of those, each
row keeping the score, coarse score and label of the region that won (``query_region``).

The per-row top ``k`` lists are enough: a gallery image in the merged top ``k`` is in the top ``k``
of the row that gives its best score (else that row alone would rank ``k`` images above it).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from retrieval.schema import REGION


def query_starts(region: pa.Array | pa.ChunkedArray | list) -> np.ndarray:
    """The rows (int64) that start a query image: the whole-image rows (``region`` null). The first
    row must be one (a query's rows are never split)."""
    arr = region if isinstance(region, (pa.Array, pa.ChunkedArray)) else pa.array(region, pa.string())
    starts = np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)).astype(np.int64)
    if len(arr) and (not len(starts) or starts[0] != 0):
        raise ValueError("query features: the first row of a file or chunk is a region, not a whole image "
                         "(each image's rows must be its whole-image row, then its regions)")
    return starts


def file_starts(url: str) -> np.ndarray:
    """:func:`query_starts` of one query feature file (its ``region`` column; every row a query
    when there is none)."""
    from retrieval import fsio

    pf = fsio.parquet_file(url)
    if REGION not in pf.schema_arrow.names:
        return np.arange(pf.metadata.num_rows, dtype=np.int64)
    return query_starts(pf.read(columns=[REGION]).column(REGION))


def merge(starts: np.ndarray, scores: np.ndarray, ids: np.ndarray, key: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold per-row top lists (``nrows x k'`` ``scores``, ``ids`` (-1: empty), merge ``key``) into
    one list per query image (rows ``starts[i]`` up to ``starts[i + 1]``): per gallery id the
    entry with the highest key (ties: the earlier row, the whole image first), then the top ``k``
    by key desc, id asc. Returns ``(ids, src_row, src_col)``, each ``nq x k``: the gallery id
    (-1 empty) and where its entry is in the input (-1 empty)."""
    nrows, width = ids.shape
    nq = len(starts)
    out_ids = np.full((nq, k), -1, np.int64)
    src_row = np.full((nq, k), -1, np.int64)
    src_col = np.full((nq, k), -1, np.int64)
    rows, cols = np.nonzero(ids >= 0)
    if not len(rows):
        return out_ids, src_row, src_col
    q = np.searchsorted(starts, rows, side="right") - 1
    g, kv = ids[rows, cols], key[rows, cols].astype(np.float64)
    kv = np.where(np.isnan(kv), -np.inf, kv)
    order = np.lexsort((cols, rows, -kv, g, q))             # per (query, gallery): best key first
    first = np.r_[True, (q[order][1:] != q[order][:-1]) | (g[order][1:] != g[order][:-1])]
    best = order[first]
    order = best[np.lexsort((g[best], -kv[best], q[best]))]  # per query: key desc, id asc
    qq = q[order]
    rank = np.arange(len(order)) - np.searchsorted(qq, qq, side="left")
    keep = rank < k
    order, qq, rank = order[keep], qq[keep], rank[keep]
    out_ids[qq, rank] = g[order]
    src_row[qq, rank] = rows[order]
    src_col[qq, rank] = cols[order]
    return out_ids, src_row, src_col


def take(values: np.ndarray, src_row: np.ndarray, src_col: np.ndarray, fill: float) -> np.ndarray:
    """``values[src_row, src_col]`` with ``fill`` where the entry is empty (-1)."""
    ok = src_row >= 0
    out = np.full(src_row.shape, fill, dtype=values.dtype)
    out[ok] = values[src_row[ok], src_col[ok]]
    return out


def merge_chunk(q: pa.Table, scores: np.ndarray, ids: np.ndarray, coarse: np.ndarray,
                norm: np.ndarray | None, k: int, labels: tuple[pa.Array, pa.Array] | None = None,
                margin: float = 0.0):
    """A chunk's per-row results (``q``: its query rows with the ``region`` column) merged per
    image: ``(queries, scores, ids, coarse, norm, query_region, labels)`` - the whole-image rows,
    the merged ``nq x k`` arrays, the region label of every kept entry and (when given: labels
    of the per-row entries in ``np.nonzero(ids >= 0)`` order) the gallery labels, both in the
    merged entries' ``np.nonzero`` order. ``margin`` (``search.region_margin``): a region row's
    merge key is its score minus this, so that a region wins a gallery image, and ranks it, only
    by more than ``margin`` over the whole image (the scores written are not changed)."""
    starts = query_starts(q.column(REGION))
    key = norm if norm is not None else scores
    if margin:
        key = key - np.float32(margin) * q.column(REGION).is_valid().to_numpy(zero_copy_only=False)[:, None]
    m_ids, src_row, src_col = merge(starts, scores, ids, key, k)
    ok = src_row >= 0
    region = q.column(REGION).take(pa.array(src_row[ok]))
    if labels is not None:
        flat = np.full(ids.shape, -1, np.int64)
        flat[ids >= 0] = np.arange(int((ids >= 0).sum()))
        at = pa.array(flat[src_row[ok], src_col[ok]])
        labels = (labels[0].take(at), labels[1].take(at))
    return (q.take(pa.array(starts)), take(scores, src_row, src_col, -np.inf), m_ids,
            take(coarse, src_row, src_col, np.nan),
            None if norm is None else take(norm, src_row, src_col, np.nan), region, labels)
