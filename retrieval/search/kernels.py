"""Compiled kernels of the search (numba): the rerank's int8 gather-dot and the per-row top-k.

**Gather-dot.** The rerank scores every (query, candidate) pair of a chunk: ``q[qidx[j]] .
codes[local[j]] * scale[local[j]]``. With int8 storage (the default) the faiss gather-dot
(``fvec_inner_products_by_idx``) needs the candidates as float32, i.e. a 4x larger copy of every
distinct candidate row per chunk, which cost as much as the dots themselves. This kernel reads the
int8 rows in place and converts them in registers, so a pair costs one 512-byte row read. The sum
is float32, vectorised (``fastmath`` allows reassociation): scores equal the float path to about
1e-6.

**Top-k.** The merge of the shards' lists and the rerank keep, per row, the ``k`` best entries
by (score desc, id asc), so the chosen SET never depends on the order the shards arrived in. One
pass per row: the k-th best score by partition, every entry above it, and the entries tied with
it by smallest id (numpy needed partitions, a tie check and fancy-index takes over the whole
matrix: 2-3x slower).

Compiled on first use in each process (``cache=True`` keeps the machine code beside the module or
in the user's cache directory; where neither is writable it is compiled without a cache, ~1 s),
parallel over pairs / rows with ``numba.set_num_threads``.
"""
from __future__ import annotations

import numpy as np

_KERNELS: dict | None = None


def _kernels() -> dict:
    global _KERNELS
    if _KERNELS is None:
        try:
            _KERNELS = _compile(cache=True)
        except RuntimeError:        # no writable cache location (read-only install, no usable HOME)
            _KERNELS = _compile(cache=False)
    return _KERNELS


def _compile(cache: bool) -> dict:
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=cache, nogil=True)
    def dots_int8(queries, qidx, codes, local, scale, out):  # pragma: no cover - compiled
        n = qidx.shape[0]
        d = queries.shape[1]
        for j in numba.prange(n):
            q = queries[qidx[j]]
            c = codes[local[j]]
            acc = np.float32(0.0)
            for t in range(d):
                acc += q[t] * np.float32(c[t])
            out[j] = acc * scale[local[j]]

    @numba.njit(parallel=True, cache=cache, nogil=True)
    def select_topk(scores, ids, k, out_s, out_i, out_c):  # pragma: no cover - compiled
        n, m = scores.shape
        for r in numba.prange(n):
            vals = np.empty(m, np.float32)
            nv = 0
            for j in range(m):
                if ids[r, j] >= 0 and np.isfinite(scores[r, j]):
                    vals[nv] = scores[r, j]
                    nv += 1
            o = 0
            if nv <= k:                       # everything valid is kept
                for j in range(m):
                    if ids[r, j] >= 0 and np.isfinite(scores[r, j]):
                        out_s[r, o] = scores[r, j]
                        out_i[r, o] = ids[r, j]
                        out_c[r, o] = j
                        o += 1
            else:
                kth = np.partition(vals[:nv], nv - k)[nv - k]     # the k-th best score
                above = 0
                ties = np.empty(m, np.int64)
                nt = 0
                for j in range(m):
                    if ids[r, j] >= 0 and np.isfinite(scores[r, j]):
                        if scores[r, j] > kth:
                            above += 1
                        elif scores[r, j] == kth:
                            ties[nt] = ids[r, j]
                            nt += 1
                need = k - above
                last = np.sort(ties[:nt])[need - 1]               # the largest tied id kept
                for j in range(m):
                    if ids[r, j] >= 0 and np.isfinite(scores[r, j]):
                        sc = scores[r, j]
                        if sc > kth or (sc == kth and ids[r, j] <= last):
                            out_s[r, o] = sc
                            out_i[r, o] = ids[r, j]
                            out_c[r, o] = j
                            o += 1
            for t in range(o, k):
                out_s[r, t] = -np.inf
                out_i[r, t] = -1
                out_c[r, t] = -1

    return {"dots_int8": dots_int8, "select_topk": select_topk}


def _threads(threads: int) -> None:
    import numba

    if threads > 0:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def pair_scores_int8(queries: np.ndarray, qidx: np.ndarray, codes: np.ndarray, local: np.ndarray,
                     scale: np.ndarray, threads: int = 0) -> np.ndarray:
    """``queries[qidx[j]] . codes[local[j]] * scale[local[j]]`` for every pair j (float32).
    ``codes``: ``m x D`` int8, ``scale``: ``m`` float32, ``queries``: ``nq x D`` float32."""
    kernel = _kernels()["dots_int8"]
    n = len(qidx)
    out = np.empty(n, np.float32)
    if n == 0:
        return out
    if codes.dtype != np.int8 or codes.ndim != 2 or queries.shape[1] != codes.shape[1]:
        raise ValueError(f"pair_scores_int8: codes {codes.dtype}{codes.shape} vs queries {queries.shape}")
    _threads(threads)
    kernel(np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(qidx, np.int64),
           np.ascontiguousarray(codes), np.ascontiguousarray(local, np.int64),
           np.ascontiguousarray(scale, np.float32), out)
    return out


def select_topk(scores: np.ndarray, ids: np.ndarray, k: int, threads: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``scores``/``ids`` (``n x m``; id -1 or a non-finite score = empty), the ``k``
    best entries by (score desc, id asc), in input column order: ``(scores, ids, columns)``, each
    ``n x k``, padded with -inf / -1 / -1."""
    n, m = scores.shape
    out_s = np.empty((n, k), np.float32)
    out_i = np.empty((n, k), np.int64)
    out_c = np.empty((n, k), np.int64)
    if n == 0 or k == 0:
        return out_s, out_i, out_c
    _threads(threads)
    _kernels()["select_topk"](np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(ids, np.int64),
                              int(k), out_s, out_i, out_c)
    return out_s, out_i, out_c
