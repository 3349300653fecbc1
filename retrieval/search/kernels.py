"""Compiled kernels of the search (numba): the rerank's int8 gather-dot and the per-row top-k.

**Gather-dot.** The rerank scores every (query, candidate) pair of a chunk's ``nq x S``
shortlist: ``q[pos // S] . codes[row] * scale[row]``, written to the pair's place ``pos`` in the
score matrix. With int8 storage (the default) the faiss gather-dot
(``fvec_inner_products_by_idx``) needs the candidates as float32, i.e. a 4x larger copy of every
distinct candidate row per chunk, which cost as much as the dots themselves. This kernel reads the
int8 rows in place and converts them in registers, so a pair costs one 512-byte row read. The sum
is float32, vectorised (``fastmath`` allows reassociation): scores equal the float path to about
1e-6.

**Grouping.** The pairs are put in (feature file, block of rows) order by one O(n) counting
sort, so each file's pairs are scored against that file's array with the rows a block reads
still in cache.

**Top-k.** The merge of the shards' lists and the rerank keep, per row, the ``k`` best entries
by (score desc, id asc), so the chosen SET never depends on the order the shards arrived in. One
pass per row: the k-th best score by partition, every entry above it, and the entries tied with
it by smallest id (numpy needed partitions, a tie check and fancy-index takes over the whole
matrix: 2-3x slower).

Compiled on first use in each process (``cache=True`` keeps the machine code beside the module or
in the user's cache directory, loaded in ~0.5 s; where neither is writable it is compiled
without a cache: 2.3 s for the three kernels, measured),
parallel over pairs / rows with ``numba.set_num_threads``.
"""
from __future__ import annotations

import numpy as np

_KERNELS: dict | None = None
kth_smallest_jit = None      # set by _compile


def _kth_smallest(a, n, kth):  # pragma: no cover - compiled by _compile
    """The kth smallest (0-based) of ``a[:n]``, by quickselect in place (np.partition and np.sort
    inside the parallel top-k loop made it compile in 9.5 s; this way 1.6 s)."""
    lo = 0
    hi = n - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            return a[kth]
    return a[lo]


def _kernels() -> dict:
    global _KERNELS
    if _KERNELS is None:
        try:
            _KERNELS = _compile(cache=True)
        except RuntimeError:        # no writable cache location (read-only install, no usable HOME)
            _KERNELS = _compile(cache=False)
    return _KERNELS


def _compile(cache: bool) -> dict:  # size-exempt: the numba kernels are defined in one factory (compiled together, cached per process)
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=cache, nogil=True)
    def dots_int8_at(queries, pos, width, codes, rows, scale, out):  # pragma: no cover - compiled
        # pair j: query pos[j] // width against row rows[j], written to out[pos[j]]
        d = queries.shape[1]
        for j in numba.prange(pos.shape[0]):
            q = queries[pos[j] // width]
            c = codes[rows[j]]
            acc = np.float32(0.0)
            for t in range(d):
                acc += q[t] * np.float32(c[t])
            out[pos[j]] = acc * scale[rows[j]]

    @numba.njit(cache=cache, nogil=True)
    def group_pairs(flat, shift, max_keys):  # pragma: no cover - compiled
        # valid entries (id >= 0) of flat, counting-sorted by (file, row >> shift); stable
        nfiles = 0
        maxrow = 0
        nvalid = 0
        for j in range(flat.shape[0]):
            g = flat[j]
            if g >= 0:
                f = g >> 32
                r = g & 0xFFFFFFFF
                if f + 1 > nfiles:
                    nfiles = f + 1
                if r > maxrow:
                    maxrow = r
                nvalid += 1
        nb = (maxrow >> shift) + 1
        if nfiles * nb > max_keys:                  # too sparse a key space: by file only
            shift = 62
            nb = 1
        counts = np.zeros(nfiles * nb + 1, np.int64)
        for j in range(flat.shape[0]):
            g = flat[j]
            if g >= 0:
                counts[(g >> 32) * nb + ((g & 0xFFFFFFFF) >> shift) + 1] += 1
        for k in range(1, counts.shape[0]):
            counts[k] += counts[k - 1]
        pos = np.empty(nvalid, np.int64)
        files = np.empty(nvalid, np.int64)
        rows = np.empty(nvalid, np.int64)
        for j in range(flat.shape[0]):
            g = flat[j]
            if g >= 0:
                k = (g >> 32) * nb + ((g & 0xFFFFFFFF) >> shift)
                d = counts[k]
                pos[d] = j
                files[d] = g >> 32
                rows[d] = g & 0xFFFFFFFF
                counts[k] = d + 1
        return pos, files, rows

    # a module global, not a closure variable: a kernel that captures a jitted closure variable is
    # never found in numba's cache (it recompiled in every process, 1.3 s per Spark worker)
    global kth_smallest_jit
    kth_smallest_jit = numba.njit(cache=cache, nogil=True)(_kth_smallest)

    @numba.njit(parallel=True, cache=cache, nogil=True)
    def select_topk(scores, ids, k, out_s, out_i, out_c):  # pragma: no cover - compiled
        n, m = scores.shape
        for r in numba.prange(n):
            vals = np.empty(m, np.float32)
            ties = np.empty(m, np.int64)
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
                kth = kth_smallest_jit(vals, nv, nv - k)              # the k-th best score
                above = 0
                nt = 0
                for j in range(m):
                    if ids[r, j] >= 0 and np.isfinite(scores[r, j]):
                        if scores[r, j] > kth:
                            above += 1
                        elif scores[r, j] == kth:
                            ties[nt] = ids[r, j]
                            nt += 1
                last = kth_smallest_jit(ties, nt, k - above - 1)      # the largest tied id kept
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

    return {"dots_int8_at": dots_int8_at, "group_pairs": group_pairs,
            "select_topk": select_topk}


def _set_numba_threads(threads: int) -> None:
    import numba

    if threads > 0:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def pair_scores_int8_into(out: np.ndarray, queries: np.ndarray, pos: np.ndarray, width: int,
                          codes: np.ndarray, rows: np.ndarray, scale: np.ndarray, threads: int = 0) -> None:
    """``out[pos[j]] = queries[pos[j] // width] . codes[rows[j]] * scale[rows[j]]`` for every j:
    the pairs of a flat ``nq x width`` shortlist scored straight into its score matrix."""
    if len(pos) == 0:
        return
    if codes.dtype != np.int8 or codes.ndim != 2 or queries.shape[1] != codes.shape[1]:
        raise ValueError(f"pair_scores_int8: codes {codes.dtype}{codes.shape} vs queries {queries.shape}")
    _set_numba_threads(threads)
    _kernels()["dots_int8_at"](np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(pos, np.int64),
                               int(width), codes, np.ascontiguousarray(rows, np.int64),
                               np.ascontiguousarray(scale, np.float32), out)


def group_pairs(flat_ids: np.ndarray, shift: int, max_keys: int = 1 << 22
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pos, files, rows)`` of the valid (``>= 0``) gallery ids in ``flat_ids``, grouped by
    feature file and, inside a file, by block of ``2^shift`` rows (a stable counting sort: O(n);
    by file only when the (file, block) key space would exceed ``max_keys``)."""
    return _kernels()["group_pairs"](np.ascontiguousarray(flat_ids, np.int64), int(shift), int(max_keys))


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
    _set_numba_threads(threads)
    _kernels()["select_topk"](np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(ids, np.int64),
                              int(k), out_s, out_i, out_c)
    return out_s, out_i, out_c
