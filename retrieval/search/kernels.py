"""Compiled gather-dot kernel of the rerank for int8-stored fine vectors (numba).

The rerank scores every (query, candidate) pair of a chunk: ``q[qidx[j]] . codes[local[j]] *
scale[local[j]]``. With int8 storage (the default) the faiss gather-dot
(``fvec_inner_products_by_idx``) needs the candidates as float32, i.e. a 4x larger copy of every
distinct candidate row per chunk, which cost as much as the dots themselves. This kernel reads the
int8 rows as stored and converts them in registers, so a pair costs one 512-byte row read. The
sum is float32, vectorised (``fastmath`` allows reassociation): scores equal the float path to
about 1e-6.

Compiled on first use in each process (``cache=True`` keeps the machine code beside the module or
in the user's cache directory; where neither is writable it is compiled without a cache, ~1 s),
parallel over pairs with ``numba.set_num_threads``.
"""
from __future__ import annotations

import numpy as np

_KERNEL = None


def _build():
    try:
        return _compile(cache=True)
    except RuntimeError:            # no writable cache location (read-only install, no usable HOME)
        return _compile(cache=False)


def _compile(cache: bool):
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

    return dots_int8


def pair_scores_int8(queries: np.ndarray, qidx: np.ndarray, codes: np.ndarray, local: np.ndarray,
                     scale: np.ndarray, threads: int = 0) -> np.ndarray:
    """``queries[qidx[j]] . codes[local[j]] * scale[local[j]]`` for every pair j (float32).
    ``codes``: ``m x D`` int8, ``scale``: ``m`` float32, ``queries``: ``nq x D`` float32."""
    global _KERNEL
    import numba

    if _KERNEL is None:
        _KERNEL = _build()
    n = len(qidx)
    out = np.empty(n, np.float32)
    if n == 0:
        return out
    if codes.dtype != np.int8 or codes.ndim != 2 or queries.shape[1] != codes.shape[1]:
        raise ValueError(f"pair_scores_int8: codes {codes.dtype}{codes.shape} vs queries {queries.shape}")
    if threads > 0:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    _KERNEL(np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(qidx, np.int64),
            np.ascontiguousarray(codes), np.ascontiguousarray(local, np.int64),
            np.ascontiguousarray(scale, np.float32), out)
    return out
