"""The scan of every feature file (checks + training sample) and the training of the empty index.

:func:`scan_file` runs once per feature file (a Spark task each, or a loop locally): it verifies
the file against its extraction manifest, counts bad vectors and draws its part of the training
sample. The sample is a per-row Bernoulli draw with rate ``train_size / N`` from a random stream
keyed by ``(seed, file_no, block of 65,536 rows)``, so it is uniform over ALL files, the same
whatever the batch size or engine, and never needs more than one batch in memory.

:func:`train_index` trains the IVF (spherical k-means: flat, or two-level for very many cells)
and the PQ codebooks (on the residuals) on the driver; the result is the empty trained index that
every shard task receives as bytes.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from retrieval import fsio
from retrieval.console import native_output
from retrieval.index.params import IndexParams
from retrieval.index.reader import FeatureFile, check_file, clean, iter_coarse

log = logging.getLogger(__name__)
SAMPLE_BLOCK = 1 << 16


@dataclass(frozen=True)
class ScanJob:
    dim: int
    rate: float           # Bernoulli rate of the training sample
    seed: int
    batch_rows: int
    verify: bool = True
    hash_ids: bool = False  # also return a 64-bit hash of every image_id (duplicate detection)
    storage_options: dict | None = None


@dataclass
class FileScan:
    file_no: int
    rows: int = 0
    valid: int = 0
    nan_inf: int = 0
    zero: int = 0
    renormalised: int = 0
    bad_rows: list = field(default_factory=list)  # up to 20 (row, reason) for the report
    sample_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sample: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    id_hashes: np.ndarray | None = None
    seconds: float = 0.0


def sample_mask(seed: int, file_no: int, start: int, n: int, rate: float) -> np.ndarray:
    """Whether each of rows ``[start, start + n)`` of file ``file_no`` is in the training sample."""
    if rate >= 1.0:
        return np.ones(n, bool)
    out = np.empty(n, bool)
    row = start
    while row < start + n:
        block = row // SAMPLE_BLOCK
        u = np.random.default_rng([seed, file_no, block]).random(SAMPLE_BLOCK)
        a = row - block * SAMPLE_BLOCK
        b = min(SAMPLE_BLOCK, start + n - block * SAMPLE_BLOCK)
        out[row - start:row - start + (b - a)] = u[a:b] < rate
        row += b - a
    return out


def scan_file(job: ScanJob, f: FeatureFile) -> FileScan:
    """Verify one feature file, count its bad vectors and draw its part of the training sample."""
    t0 = time.monotonic()
    fsio.configure(job.storage_options)
    check_file(f, job.dim, job.verify)
    out = FileScan(file_no=f.file_no, rows=f.rows)
    rows, parts = [], []
    for row0, x in iter_coarse(f.url, 0, f.rows, job.batch_rows):
        valid, nan_inf, zero, renorm = clean(x)
        out.valid += int(valid.sum())
        out.nan_inf += int(nan_inf.sum())
        out.zero += int(zero.sum())
        out.renormalised += renorm
        for mask, reason in ((nan_inf, "nan_inf"), (zero, "zero")):
            for r in np.nonzero(mask)[0][:20 - len(out.bad_rows)].tolist():
                out.bad_rows.append((row0 + r, reason))
        pick = sample_mask(job.seed, f.file_no, row0, len(x), job.rate) & valid
        if pick.any():
            idx = np.nonzero(pick)[0]
            rows.append(row0 + idx)
            parts.append(x[idx])
    out.sample_rows = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    out.sample = np.concatenate(parts) if parts else np.zeros((0, job.dim), np.float32)
    if job.hash_ids:
        from retrieval.index.dedup import file_hashes

        out.id_hashes = file_hashes(f)
    out.seconds = round(time.monotonic() - t0, 3)
    return out


def set_threads(threads: int | str) -> int:
    """faiss's OpenMP threads: ``threads``, or for ``auto`` all cores."""
    n = threads if threads != "auto" and threads > 0 else (os.cpu_count() or 1)
    faiss.omp_set_num_threads(n)
    return n


def _kmeans(x: np.ndarray, params: IndexParams, seed: int) -> np.ndarray:
    """Spherical k-means centroids (inner product on L2-normalised vectors)."""
    nlist = params.nlist
    if params.kmeans == "two_level" and nlist >= 64:
        from faiss.contrib.clustering import two_level_clustering

        centroids, _ = two_level_clustering(x, int(math.sqrt(nlist)), nlist,
                                            clustering_niter=params.kmeans_iters, spherical=True,
                                            seed=seed)
        return np.ascontiguousarray(centroids, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], nlist, niter=params.kmeans_iters, spherical=True, seed=seed,
                      max_points_per_centroid=max(256, -(-len(x) // nlist)))
    km.train(x)
    return km.centroids


def train_index(params: IndexParams, sample: np.ndarray, seed: int = 0) -> faiss.Index:
    """The empty trained index (inner product) for ``params``, trained on ``sample``."""
    x = np.ascontiguousarray(sample, dtype=np.float32)
    if len(x) < params.nlist:
        raise ValueError(f"{len(x)} training vectors for {params.nlist} IVF cells: need at least one each")
    index = faiss.index_factory(x.shape[1], params.index_key, faiss.METRIC_INNER_PRODUCT)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = index.chain.at(i)
            with native_output("faiss"):     # its warnings go to the log file, not the console
                vt.train(x)
            x = vt.apply(x)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))  # a non-owning view of the IVF level
    if ivf is None:  # pragma: no cover - parse_forced_key refuses non-IVF keys first
        raise ValueError(f"index key {params.index_key!r} is not an IVF index")
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False  # not used for search; costs 10x the PQ training
    ivf.cp.seed = seed
    if params.nlist > 1:
        t = time.monotonic()
        with native_output("faiss"):         # "WARNING clustering N points to K centroids ..."
            centroids = _kmeans(x, params, seed)
        ivf.quantizer.add(centroids)
        log.info("k-means: %d cells from %d vectors (%s) in %.1fs", params.nlist, len(x), params.kmeans,
                 time.monotonic() - t)
    t = time.monotonic()
    with native_output("faiss"):
        ivf.train(x)  # quantizer already holds nlist centroids: trains only the codes (PQ on residuals)
    log.info("codes trained in %.1fs", time.monotonic() - t)
    index.is_trained = True
    return index


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
