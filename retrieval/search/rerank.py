"""Rerank stage: exact 512-d cosine of each query against its shortlist, then the top ``k``.

The shortlist of a query chunk is an ``nq x S`` matrix of gallery int64 ids. The ids say where
each candidate's fine vector lives (``feature_files[file_no]``, row), so the rerank reads, file by
file, only the Parquet row groups that hold candidates (:func:`retrieval.index.idmap.fetch_rows`),
each needed row once per chunk however many queries share it, dequantises that block once, and
scores every (query, candidate) pair of the file in one multi-threaded faiss call
(``fvec_inner_products_by_idx``: a gather-dot over the block, no per-query Python loop). At most
``batch_rows`` gallery rows are held at a time, so a task's memory is bounded by
``batch_rows x 2 KiB`` plus the chunk's ``nq x S`` matrices.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from retrieval import fsio
from retrieval.index import idmap
from retrieval.schema import fine_matrix
from retrieval.search.coarse import topk_rows


def pair_scores_into(out: np.ndarray, queries: np.ndarray, block: np.ndarray, local: np.ndarray) -> None:
    """``out[r, c] = queries[r] . block[local[r, c]]`` wherever ``local[r, c] >= 0`` (other
    entries are left as they are). ``queries``: nq x d, ``block``: nb x d, ``local``: nq x m."""
    import faiss

    nq, m = local.shape
    if nq == 0 or m == 0 or len(block) == 0:
        return
    q = np.ascontiguousarray(queries, dtype=np.float32)
    b = np.ascontiguousarray(block, dtype=np.float32)
    loc = np.ascontiguousarray(local, dtype=np.int64)
    tmp = np.empty((nq, m), np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(tmp), faiss.swig_ptr(q), faiss.swig_ptr(b),
                                     faiss.swig_ptr(loc), q.shape[1], nq, m)
    np.copyto(out, tmp, where=loc >= 0)


def _check_rows(url: str, expected: int | None) -> None:
    if expected is None:
        return
    fs, path = fsio.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        n = pq.ParquetFile(fh).metadata.num_rows
    if n != expected:
        raise ValueError(f"gallery feature file {url} has {n} rows but the index manifest says "
                         f"{expected}: the file was replaced or truncated after indexing")


def score_shortlist(query_fine: np.ndarray, ids: np.ndarray, feature_files: Sequence[str],
                    batch_rows: int = 131072, expected_rows: Sequence[int | None] | None = None
                    ) -> np.ndarray:
    """Exact fine scores (nq x S float32, -inf where ``ids`` is -1) of a shortlist."""
    nq, s = ids.shape
    scores = np.full((nq, s), -np.inf, np.float32)
    valid = ids >= 0
    if not valid.any():
        return scores
    files, rows = idmap.decode_ids(np.where(valid, ids, 0))
    files = np.where(valid, files, -1)
    for f in np.unique(files[valid]).tolist():
        if f >= len(feature_files):
            raise KeyError(f"shortlist id refers to feature file #{f}, the index has {len(feature_files)}")
        in_file = files == f
        if expected_rows is not None:
            _check_rows(feature_files[f], expected_rows[f])
        needed = np.unique(rows[in_file])
        for a in range(0, len(needed), batch_rows):
            batch = needed[a:a + batch_rows]
            table = idmap.fetch_rows([feature_files[f]], idmap.encode_ids(0, batch), ["fine", "fine_scale"]
                                     if _has_scale(feature_files[f]) else ["fine"])
            block = fine_matrix(table)
            lo, hi = batch[0], batch[-1]
            sel = in_file & (rows >= lo) & (rows <= hi)
            local = np.full((nq, s), -1, np.int64)
            local[sel] = np.searchsorted(batch, rows[sel])
            pair_scores_into(scores, query_fine, block, local)
    return scores


_SCALE_CACHE: dict[str, bool] = {}


def _has_scale(url: str) -> bool:
    """Whether a feature file stores int8 fine vectors (with a ``fine_scale`` column)."""
    if url not in _SCALE_CACHE:
        fs, path = fsio.url_to_fs(url)
        with fs.open(path, "rb") as fh:
            _SCALE_CACHE[url] = "fine_scale" in pq.ParquetFile(fh).schema_arrow.names
    return _SCALE_CACHE[url]


def rerank(query_fine: np.ndarray, ids: np.ndarray, coarse_scores: np.ndarray,
           feature_files: Sequence[str], k: int, match_threshold: float | None = None,
           batch_rows: int = 131072, expected_rows: Sequence[int | None] | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``k`` of each query's shortlist by exact fine cosine: ``(scores, ids, coarse)``, each
    ``nq x k``, rows ordered by score desc then gallery id asc; empty slots have id -1."""
    fine = score_shortlist(query_fine, ids, feature_files, batch_rows, expected_rows)
    if match_threshold is not None:
        fine = np.where(fine >= match_threshold, fine, -np.inf)
    top_s, top_i = topk_rows(fine, np.where(np.isfinite(fine), ids, -1), k, ordered=True)
    # coarse score of each kept id (ids are unique within a shortlist row)
    coarse = np.full(top_i.shape, np.nan, np.float32)
    for r in range(0, len(ids), 1024):
        ti, si = top_i[r:r + 1024], ids[r:r + 1024]
        match = ti[:, :, None] == si[:, None, :]
        col = match.argmax(axis=2)
        c = np.take_along_axis(coarse_scores[r:r + 1024], col, axis=1)
        coarse[r:r + 1024] = np.where((ti >= 0) & match.any(axis=2), c, np.nan)
    return top_s, top_i, coarse
