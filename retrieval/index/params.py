"""Index parameters from the gallery size N and a memory budget (the rule of docs/index.md).

- ``nlist`` (IVF cells): the power of two nearest ``4 * sqrt(N)``, at most ``N / 39`` (faiss wants
  >= 39 training points per centroid), at least 1. Fine cells matter more than anything else for
  the shortlist objective: the true match must fall in one of the ``nprobe`` probed cells.
- training sample: ``train_points_per_centroid * nlist`` vectors (capped by ``max_train_points``
  and N), drawn uniformly over all feature files.
- PQ bytes ``M``: the largest power of two dividing the dimension with
  ``M + 8 (int64 id) + trained part / N <= bytes_per_vector`` (the memory budget), capped at
  ``max_pq_bytes``: whether the true match lands in a 500-long shortlist is decided by the cells,
  not by the code size (measured: PQ8, PQ16 and PQ32 give the same top-500 hit rate), so bigger
  codes only cost memory; the 512-d rerank ranks precisely.
- codes: 4-bit PQ in faiss's fast-scan layout (``PQ{2M}x4fs``: 2M sub-quantizers of 16
  centroids, the same M bytes per vector; ``index.fast_scan``): searched with SIMD lookup tables,
  2.3-2.8x faster coarse stage than 8-bit ``PQ{M}`` for the same share of true matches in the shortlist
  (measured on the 1M search benchmark, docs/search.md). Fast-scan stores each inverted list in
  blocks of 32 codes, so it is used only where a shard's lists hold at least 32 vectors on
  average (shard size / ``nlist``; the padding, ~16 codes per list per shard, counts in
  the budget). Otherwise, or when ``index.fast_scan`` is false or the build merges on disk
  (``--merge-ondisk``: faiss cannot merge fast-scan lists on disk): 8-bit ``PQ{M}`` (with
  ``nbits`` lowered for small training samples).
- quantizer: flat (exact) up to 16,384 cells, HNSW32 above (the assignment of 10^9 vectors to
  ~10^5 centroids is too slow by brute force); k-means: flat up to 16,384 cells, two-level above.
- Fewer than 1,000 vectors: ``IVF1,Flat`` (exact).
- Any faiss factory string of an IVF index can be forced with ``index.index_key``.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from retrieval.config import Config, ConfigError

FLAT_QUANTIZER_MAX = 16384
MIN_POINTS_PER_CENTROID = 39
ID_BYTES = 8
TINY = 1000  # fewer vectors: IVF1,Flat


@dataclass(frozen=True)
class IndexParams:
    index_key: str
    nlist: int
    pq_m: int                # PQ sub-quantizers M; 0 when not a PQ index
    pq_nbits: int
    pq_bytes: int            # code bytes per vector, ceil(M x nbits / 8); 0 when not a PQ index
    train_size: int          # target number of training vectors
    kmeans: str              # flat | two_level
    kmeans_iters: int
    nprobe_grid: tuple[int, ...]
    forced: bool             # index_key came from the config
    bytes_per_vector_est: float  # codes + id + trained part / N (in memory and on disk)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["nprobe_grid"] = list(self.nprobe_grid)
        return d


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def choose_nlist(n: int) -> int:
    """Power of two nearest 4*sqrt(n), at most n/39 (training points per centroid), >= 1."""
    if n < 2 * MIN_POINTS_PER_CENTROID:
        return 1
    target = 1 << int(round(math.log2(4.0 * math.sqrt(n))))
    return max(1, min(target, _pow2_floor(n / MIN_POINTS_PER_CENTROID), 1 << 20))


def nprobe_grid(nlist: int, max_nprobe: int = 256) -> tuple[int, ...]:
    """Powers of two from 1 to min(nlist, max_nprobe): the values tried at build time."""
    top = min(nlist, max_nprobe)
    grid, p = [], 1
    while p < top:
        grid.append(p)
        p *= 2
    grid.append(top)
    return tuple(grid)


FAST_SCAN_BLOCK = 32      # faiss stores fast-scan codes in blocks of 32 vectors per inverted list
_FAST_SCAN_RE = re.compile(r"x\d+fs|fs(,|$)")


def is_fast_scan(index_key: str) -> bool:
    """Whether a faiss factory string makes fast-scan (blocked 4-bit) codes, e.g. ``PQ32x4fs``."""
    return bool(_FAST_SCAN_RE.search(index_key))


def _block_padding(n: int, nlist: int, vectors_per_shard: int) -> float:
    """Fast-scan padding, in codes per stored code: every inverted list of every shard is rounded
    up to a whole block, half a block (16 codes) on average, so ``16 x nlist`` codes per shard of
    ``N / ceil(N / vectors_per_shard)`` vectors (1M in 2 shards of 500k, 4,096 lists: +13%, 2 B/vector;
    measured 28.3 B/vector against 26.6 for 8-bit PQ16). Bigger shards (a cluster's 10-50M) pad
    proportionally less."""
    return FAST_SCAN_BLOCK / 2 * nlist / _shard_size(n, vectors_per_shard)


def _shard_size(n: int, vectors_per_shard: int) -> float:
    """Vectors per index shard: N cut into ceil(N / vectors_per_shard) balanced shards."""
    return n / max(1, math.ceil(n / max(1, vectors_per_shard)))


def _trained_bytes(dim: int, nlist: int, pq_nbits: int) -> int:
    return 4 * dim * nlist + 4 * dim * (1 << pq_nbits)


_IVF_RE = re.compile(r"IVF(\d+)")


def parse_forced_key(key: str) -> tuple[int, int, int]:
    """(nlist, PQ M, nbits) of a forced factory string; refuses non-IVF indexes."""
    m = _IVF_RE.search(key)
    if not m:
        raise ConfigError(f"config key 'index.index_key' = {key!r}: must describe an IVF index "
                          "(e.g. 'IVF4096,PQ16'): the index is sharded by inverted lists")
    nlist = int(m.group(1))
    pq = re.search(r",PQ(\d+)(?:x(\d+))?", key)
    if pq:
        return nlist, int(pq.group(1)), int(pq.group(2)) if pq.group(2) else 8
    return nlist, 0, 8


def choose_params(n: int, dim: int, cfg: Config, fast_scan: bool | None = None) -> IndexParams:
    """The index parameters for ``n`` gallery vectors of dimension ``dim`` under ``cfg.index``
    (``fast_scan``: 4-bit fast-scan codes; default ``index.fast_scan``)."""
    index_cfg = cfg["index"]
    fast_scan = bool(index_cfg["fast_scan"]) if fast_scan is None else fast_scan
    if n <= 0:
        raise ValueError("no vectors to index")
    forced = index_cfg["index_key"] != "auto"
    if forced:
        nlist, pq_m, nbits = parse_forced_key(index_cfg["index_key"])
        key = index_cfg["index_key"]
    else:
        nlist = choose_nlist(n) if index_cfg["nlist"] == "auto" else index_cfg["nlist"]
    train_size = int(min(n, nlist * index_cfg["train_points_per_centroid"], index_cfg["max_train_points"]))
    train_size = max(train_size, min(n, nlist))  # k-means needs at least one point per centroid
    if not forced and n < TINY:
        # a tiny gallery: one exact list (memory is no concern, PQ codebooks cannot be trained)
        nlist, pq_m, nbits, key = 1, 0, 8, "IVF1,Flat"
        train_size = min(n, TINY)
    elif not forced:
        # fast-scan only where a shard's lists fill its 32-vector blocks on average
        fast_scan = fast_scan and _shard_size(n, index_cfg["vectors_per_shard"]) / nlist >= FAST_SCAN_BLOCK
        # PQ codebooks have 2^nbits centroids per sub-quantizer: keep >= 16 points each
        nbits = 4 if fast_scan else min(8, max(4, int(math.log2(train_size / 16))))
        pq_m = 0
        # the trained part (centroids + codebooks) counts, amortised over N; for a tiny gallery
        # where it alone exceeds the budget, only codes + ids are held to it
        pad = _block_padding(n, nlist, index_cfg["vectors_per_shard"]) if fast_scan else 0.0
        for trained in (_trained_bytes(dim, nlist, nbits) / n, 0.0):
            budget = index_cfg["bytes_per_vector"] - ID_BYTES - trained
            m = 2 if fast_scan else 1   # fast-scan packs codes two 4-bit sub-quantizers per byte
            while m <= min(dim, index_cfg["max_pq_bytes"] * 8 // nbits):
                if dim % m == 0 and m * nbits / 8 * (1 + pad) <= budget:
                    pq_m = m
                m *= 2
            if pq_m:
                break
        if pq_m == 0:
            raise ConfigError(
                f"config key 'index.bytes_per_vector' = {index_cfg['bytes_per_vector']}: too small "
                f"(an int64 id takes {ID_BYTES} B per vector, plus at least 1 B of code)")
        quantizer = "" if nlist <= FLAT_QUANTIZER_MAX else "_HNSW32"
        suffix = "x4fs" if fast_scan else ("" if nbits == 8 else f"x{nbits}")
        key = f"IVF{nlist}{quantizer},PQ{pq_m}{suffix}"
    pq_bytes = (pq_m * nbits + 7) // 8
    kmeans = index_cfg["kmeans"]
    if kmeans == "auto":
        kmeans = "flat" if nlist <= FLAT_QUANTIZER_MAX else "two_level"
    code = pq_bytes if pq_bytes else 4 * dim
    if is_fast_scan(key):
        code *= 1 + _block_padding(n, nlist, index_cfg["vectors_per_shard"])
    est = code + ID_BYTES + _trained_bytes(dim, nlist, nbits) / n
    return IndexParams(index_key=key, nlist=nlist, pq_m=pq_m, pq_nbits=nbits, pq_bytes=pq_bytes,
                       train_size=train_size, kmeans=kmeans, kmeans_iters=index_cfg["kmeans_iters"],
                       nprobe_grid=nprobe_grid(nlist, index_cfg["max_nprobe"]), forced=forced,
                       bytes_per_vector_est=round(est, 2))
