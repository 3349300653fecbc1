"""Rerank stage: exact 512-d cosine of each query against its shortlist, then the top ``k``.

The shortlist of a query chunk is an ``nq x S`` matrix of gallery int64 ids. The ids say where
each candidate's fine vector lives (``feature_files[file_no]``, row: :mod:`retrieval.index.idmap`),
so the rerank works file by file: the row groups holding the file's candidates are made
resident in the process's :class:`~retrieval.search.vectors.VectorCache` (only those groups are
read, each decoded once per process into one whole-file array), and every (query, candidate) pair
of the file is scored in one parallel call that reads each candidate row in place by its row
number: no per-query Python loop and no gather copy of the candidates. int8 rows (the default
storage) by the compiled kernel of :mod:`retrieval.search.kernels`, which converts them in
registers and applies the per-vector scale; float32 rows by faiss's
``fvec_inner_products_by_idx``. A task's memory is the chunk's ``nq x S`` matrices plus the
cache (``search.vector_cache_mb``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from retrieval.search.coarse import topk_rows
from retrieval.search.kernels import group_pairs, pair_scores_int8_into
from retrieval.search.vectors import VectorCache


LOCALITY_SHIFT = 10      # pairs are scored in blocks of 2^10 gallery rows


def pair_scores(queries: np.ndarray, qidx: np.ndarray, block: np.ndarray, local: np.ndarray) -> np.ndarray:
    """``queries[qidx[j]] . block[local[j]]`` for every pair j; ``qidx`` must be non-decreasing.
    The pairs are laid out one padded row per query and scored by one multi-threaded faiss call
    (``fvec_inner_products_by_idx``), so there is no per-pair or per-query Python work."""
    import faiss

    n = len(qidx)
    if n == 0:
        return np.zeros(0, np.float32)
    starts = np.flatnonzero(np.r_[True, qidx[1:] != qidx[:-1]])
    counts = np.diff(np.r_[starts, n])
    row = np.repeat(np.arange(len(starts)), counts)
    col = np.arange(n) - np.repeat(starts, counts)
    m = int(counts.max())
    ids = np.full((len(starts), m), -1, np.int64)
    ids[row, col] = local
    q = np.ascontiguousarray(queries[qidx[starts]], dtype=np.float32)
    b = np.ascontiguousarray(block, dtype=np.float32)
    out = np.empty((len(starts), m), np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(b),
                                     faiss.swig_ptr(ids), q.shape[1], len(starts), m)
    return out[row, col]


def score_pairs_into(out: np.ndarray, query_fine: np.ndarray, pos: np.ndarray, width: int,
                     codes: np.ndarray, rows: np.ndarray, scale: np.ndarray | None, threads: int = 0) -> None:
    """``out[pos[j]] = query_fine[pos[j] // width] . codes[rows[j]]`` (times ``scale[rows[j]]``
    when given) for every pair j of a flat ``nq x width`` shortlist: int8 codes by the compiled
    kernel (in place, any pair order), float32 by :func:`pair_scores` (in query order)."""
    if codes.dtype == np.int8 and scale is not None:
        pair_scores_int8_into(out, query_fine, pos, width, codes, rows, scale, threads)
        return
    o = np.argsort(pos, kind="stable")
    p, r = pos[o], rows[o]
    vals = pair_scores(query_fine, p // width, codes.astype(np.float32, copy=False), r)
    if scale is not None:                           # apply the per-vector scale
        vals *= scale[r]
    out[p] = vals


def score_shortlist(query_fine: np.ndarray, ids: np.ndarray, feature_files: Sequence[str],
                    expected_rows: Sequence[int | None] | None = None,
                    cache: VectorCache | None = None, versions: Sequence[str | None] | None = None
                    ) -> np.ndarray:
    """Exact fine scores (nq x S float32, -inf where ``ids`` is -1) of a shortlist."""
    cache = cache if cache is not None else VectorCache(0)
    nq, s = ids.shape
    scores = np.full(nq * s, -np.inf, np.float32)
    if not (ids >= 0).any():
        return scores.reshape(nq, s)
    # the pairs grouped by feature file and, inside a file, by block of 1,024 rows (512 KiB of
    # int8 codes: the rows a block's pairs read stay in the core's cache; the kernel runs 1.4x
    # faster than in query order), one O(n) counting sort
    pos, files, rows = group_pairs(ids.ravel(), LOCALITY_SHIFT)
    bounds = np.flatnonzero(np.r_[True, files[1:] != files[:-1], True])
    query_fine = np.ascontiguousarray(query_fine, np.float32)
    for a, b in zip(bounds[:-1], bounds[1:]):
        f = int(files[a])
        if f >= len(feature_files):
            raise KeyError(f"shortlist id refers to feature file #{f}, the index has {len(feature_files)}")
        url, version = feature_files[f], versions[f] if versions is not None else None
        footer = cache.footer(url, version)
        expected = expected_rows[f] if expected_rows is not None else None
        if expected is not None and footer.num_rows != expected:
            raise ValueError(f"gallery feature file {url} has {footer.num_rows} rows but the index "
                             f"manifest says {expected}: the file was replaced or truncated after indexing")
        p, r = pos[a:b], rows[a:b]
        codes, scale = cache.vectors(url, r, version)      # whole-file arrays, r's groups loaded
        score_pairs_into(scores, query_fine, p, s, codes, r, scale, cache.threads)
    return scores.reshape(nq, s)


def rerank(query_fine: np.ndarray, ids: np.ndarray, coarse_scores: np.ndarray,
           feature_files: Sequence[str], k: int, match_threshold: float | None = None,
           expected_rows: Sequence[int | None] | None = None,
           cache: VectorCache | None = None, versions: Sequence[str | None] | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``k`` of each query's shortlist by exact fine cosine: ``(scores, ids, coarse)``, each
    ``nq x k``, rows ordered by score desc then gallery id asc; empty slots have id -1."""
    fine = score_shortlist(query_fine, ids, feature_files, expected_rows, cache, versions)
    return select(fine, ids, coarse_scores, k, match_threshold)


def select(fine: np.ndarray, ids: np.ndarray, coarse_scores: np.ndarray, k: int,
           match_threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rerank's choice from scored shortlists (``nq x S`` fine scores, ids, coarse scores):
    entries below ``match_threshold`` dropped, then per row the top ``k`` by fine score desc, id
    asc: ``(scores, ids, coarse)``, each ``nq x k``, empty slots id -1 / coarse NaN."""
    if match_threshold is not None:
        fine = np.where(fine >= match_threshold, fine, -np.inf)
    top_s, top_i, cols = topk_rows(fine, np.where(np.isfinite(fine), ids, -1), k, ordered=True,
                                   return_cols=True)
    coarse = np.take_along_axis(coarse_scores, np.maximum(cols, 0), axis=1).astype(np.float32)
    coarse[cols < 0] = np.nan
    return top_s, top_i, coarse
