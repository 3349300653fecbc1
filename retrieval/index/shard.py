"""One index shard: a slice of the gallery added to a copy of the trained index (one task).

A slice is a list of segments ``(file_no, url, start, end)`` (row ranges of feature files), cut
from the concatenation of all new feature files by a target number of vectors per shard, so the
shard count does not depend on how many feature files there are. The task reads its rows
batch by batch, drops bad vectors (:func:`reader.clean`) and duplicate rows, adds the rest with
``add_with_ids`` (ids: ``idmap.encode_ids(file_no, row)``) and commits, each atomically:
``shard-NNNNN.index`` then ``_shards/shard-NNNNN.json`` (the marker: sha256, fingerprint,
counts). A rerun reuses a shard whose marker fingerprint matches and whose file still has the
marker's sha256.

A shard file holds only the inverted lists (codes + ids) of the IVF, with an EMPTY coarse
quantizer: the trained part (centroids, codebooks, any transform) is stored once, in
``trained.index``, and put back by :func:`attach` when a shard is loaded. (Eight shard files each
repeating a 4096 x 128 quantizer would add 2 MB each.)

While the vectors are in memory, the task also computes its part of the build-time quality
figures: the exact top-k of the quality queries over its vectors, and the shard's approximate
top-k at every nprobe of the tuning grid (:mod:`retrieval.index.quality` merges them).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from retrieval import faults, fsio
from retrieval.engine import task_attempt
from retrieval.index import finecopy, idmap
from retrieval.index.quality import Partial, cell_of_ids, exact_topk
from retrieval.index.reader import clean, iter_coarse
from retrieval.index.quantizer import deserialize, set_threads
from retrieval.progress import Progress

log = logging.getLogger(__name__)

_TRAINED: dict[str, faiss.Index] = {}


def shard_file(shard: int) -> str:
    return f"shard-{shard:05d}.index"


def marker_file(shard: int) -> str:
    return f"_shards/shard-{shard:05d}.json"


@dataclass(frozen=True)
class SliceSpec:
    shard: int
    segments: tuple  # ((file_no, url, start, end), ...)
    skip: tuple      # ((file_no, np.ndarray of duplicate rows), ...)
    fingerprint: str

    def rows(self) -> int:
        return sum(e - s for _, _, s, e in self.segments)


@dataclass(frozen=True)
class ShardJob:
    output: str
    trained_sha256: str
    batch_rows: int
    threads: int | str              # a number or auto
    queries: np.ndarray  # quality queries (nq x d), may be empty
    source_ids: np.ndarray  # the gallery ids the quality and tuning queries were made from
    k: int
    grid: tuple
    faults: dict | None = None
    storage_options: dict | None = None
    progress_seconds: float = 10.0
    fine_by_list: bool = False      # also write the shard's fine vectors ordered by IVF list (finecopy.py)


@dataclass
class ShardResult:
    stats: list = field(default_factory=list)  # one dict per shard
    quality: Partial | None = None

    def merge(self, other: "ShardResult") -> "ShardResult":
        q = other.quality if self.quality is None else \
            (self.quality if other.quality is None else self.quality.merge(other.quality))
        return ShardResult(self.stats + other.stats, q)


def plan_slices(files: list[tuple[int, str, int]], vectors_per_shard: int, first_shard: int,
                skip_rows, base_fingerprint: str) -> list[SliceSpec]:
    """Cut the concatenated rows of ``files`` ((file_no, url, rows), in order) into
    ``ceil(total / vectors_per_shard)`` balanced slices; ``skip_rows(file_no, start, end)`` gives
    the duplicate rows of a segment."""
    total = sum(r for _, _, r in files)
    n = max(1, -(-total // vectors_per_shard))
    bounds = np.linspace(0, total, n + 1).round().astype(np.int64)
    starts = np.cumsum([0] + [r for _, _, r in files])
    slices = []
    for k in range(n):
        a, b = int(bounds[k]), int(bounds[k + 1])
        segs, skips = [], []
        h = hashlib.sha256(base_fingerprint.encode())
        for (file_no, url, rows), off in zip(files, starts[:-1].tolist()):
            s, e = max(a, off) - off, min(b, off + rows) - off
            if s < e:
                segs.append((file_no, url, s, e))
                dup = skip_rows(file_no, s, e)
                if len(dup):
                    skips.append((file_no, dup))
                h.update(f"{file_no}:{s}:{e}:".encode())
                h.update(np.ascontiguousarray(dup, dtype=np.int64).tobytes())
        slices.append(SliceSpec(shard=first_shard + k, segments=tuple(segs), skip=tuple(skips),
                                fingerprint=h.hexdigest()[:32]))
    return slices


def trained_index(data: bytes, sha256: str) -> faiss.Index:
    """The empty trained index, deserialised once per process (per sha256)."""
    if sha256 not in _TRAINED:
        if len(_TRAINED) >= 2:
            _TRAINED.pop(next(iter(_TRAINED)))
        _TRAINED[sha256] = deserialize(data)
    return _TRAINED[sha256]


def shard_bytes(index: faiss.Index) -> bytes:
    """The inverted lists of a populated index, serialised as a faiss IVF with an empty quantizer."""
    ivf = faiss.extract_index_ivf(index)
    quantizer = ivf.quantizer
    empty = faiss.IndexFlat(ivf.d, ivf.metric_type)  # referenced here while the IVF points to it
    ivf.quantizer = empty
    try:
        return faiss.serialize_index(ivf).tobytes()
    finally:
        ivf.quantizer = quantizer


def attach(trained: faiss.Index, shard_ivf: faiss.Index) -> faiss.Index:
    """A searchable index from a shard's IVF (empty quantizer) and the trained index: the
    quantizer (and any pre-transform) is shared, not copied."""
    tivf = faiss.extract_index_ivf(trained)
    if shard_ivf.nlist != tivf.nlist or shard_ivf.d != tivf.d:
        raise ValueError(f"shard has {shard_ivf.nlist} lists of dim {shard_ivf.d}, the trained index "
                         f"{tivf.nlist} of dim {tivf.d}")
    shard_ivf.quantizer = tivf.quantizer
    shard_ivf.own_fields = False
    shard_ivf.referenced_objects = [trained]  # keeps the shared quantizer alive
    if isinstance(trained, faiss.IndexPreTransform):
        index = faiss.IndexPreTransform(shard_ivf)
        for i in reversed(range(trained.chain.size())):
            index.prepend_transform(trained.chain.at(i))
        index.referenced_objects = [trained, shard_ivf]
        return index
    return shard_ivf


def load_bytes(data: bytes, trained: faiss.Index) -> faiss.Index:
    return attach(trained, deserialize(data))


def _populate(job: ShardJob, spec: SliceSpec, trained_data: bytes, build: bool):
    """Read the slice; add it to a fresh copy of the trained index (``build``) and compute the exact
    part of the quality figures. Returns (index or None, counts, exact partial)."""
    index = deserialize(trained_data) if build else None
    counts = {"rows": 0, "added": 0, "nan_inf": 0, "zero": 0, "duplicates": 0, "renormalised": 0}
    q = job.queries
    exact = None
    skips = {f: rows for f, rows in spec.skip}
    progress = Progress(f"index shard {spec.shard}", total=spec.rows(), every=job.progress_seconds,
                        unit="vectors")
    for file_no, url, start, end in spec.segments:
        dup = skips.get(file_no, np.zeros(0, np.int64))
        for row0, x in iter_coarse(url, start, end, job.batch_rows):
            valid, nan_inf, zero, renorm = clean(x)
            counts["nan_inf"] += int(nan_inf.sum())
            counts["zero"] += int(zero.sum())
            counts["renormalised"] += renorm
            d = dup[(dup >= row0) & (dup < row0 + len(x))] - row0
            if len(d):
                counts["duplicates"] += int(valid[d].sum())
                valid[d] = False
            counts["rows"] += len(x)
            keep = np.nonzero(valid)[0]
            xs = x[keep] if len(keep) < len(x) else x
            ids = idmap.encode_ids(file_no, row0 + keep)
            if index is not None and len(xs):
                index.add_with_ids(xs, ids)
            counts["added"] += len(xs)
            if len(q) and len(xs):
                part = exact_topk(q, xs, ids, job.k)
                exact = part if exact is None else exact.merge_exact(part, job.k)
            progress.update(len(x))
            faults.maybe_fail(job.faults, "index", spec.shard, counts["rows"])
    progress.finish()
    return index, counts, exact


def build_shard(job: ShardJob, trained_data: bytes, spec: SliceSpec) -> ShardResult:
    """Build (or reuse, when finished by an earlier run) one shard; return its stats and its part
    of the quality figures."""
    t0 = time.monotonic()
    fsio.configure(job.storage_options)
    set_threads(job.threads)
    trained = trained_index(trained_data, job.trained_sha256)
    shard_url = fsio.join(job.output, shard_file(spec.shard))
    marker_url = fsio.join(job.output, marker_file(spec.shard))
    reuse = None
    if fsio.exists(marker_url) and fsio.exists(shard_url):
        try:
            marker = fsio.read_json(marker_url)
        except Exception:
            marker = {}
        if marker.get("fingerprint") == spec.fingerprint and marker.get("trained_sha256") == job.trained_sha256:
            data = fsio.read_bytes(shard_url)
            if fsio.sha256_bytes(data) == marker.get("sha256"):
                reuse = (marker, data)
            else:
                log.warning("shard %d: %s does not match its marker's sha256: rebuilding it",
                            spec.shard, shard_url)
    index, counts, exact = _populate(job, spec, trained_data, build=reuse is None)
    if reuse is None:
        data = shard_bytes(index)
        fsio.write_bytes(shard_url, data)
        stats = {"shard": spec.shard, "file": shard_file(spec.shard), "sha256": fsio.sha256_bytes(data),
                 "bytes": len(data), "ntotal": int(index.ntotal), "fingerprint": spec.fingerprint,
                 "trained_sha256": job.trained_sha256,
                 "segments": [[f, s, e] for f, _, s, e in spec.segments], "skipped": counts,
                 "seconds": round(time.monotonic() - t0, 3), "reused": False, "attempt": task_attempt()}
        fsio.write_json(marker_url, stats)
    else:
        marker, data = reuse
        index = load_bytes(data, trained)
        if int(index.ntotal) != counts["added"]:
            raise RuntimeError(f"shard {shard_url} holds {index.ntotal} vectors, its slice {counts['added']}")
        stats = dict(marker, reused=True, seconds=round(time.monotonic() - t0, 3))
    if job.fine_by_list and not finecopy.reusable(job.output, stats.get("fine_by_list")):
        stats["fine_by_list"] = finecopy.write_copy(job.output, spec.shard, faiss.extract_index_ivf(index),
                                                    spec.segments)
        fsio.write_json(marker_url, stats)
    quality = None
    if len(job.queries):
        approx = {}
        ivf = faiss.extract_index_ivf(index)
        for nprobe in job.grid:
            ivf.nprobe = nprobe
            approx[nprobe] = index.search(job.queries, job.k)
        if exact is not None:
            exact = exact.with_cells(cell_of_ids(ivf, exact.ids))
        quality = Partial.from_shard(exact, approx, len(job.queries), job.k,
                                     cell_of_ids(ivf, job.source_ids))
    log.info("shard %d: %d vectors (%s) in %.1fs", spec.shard, stats["ntotal"],
             "reused" if reuse else "built", time.monotonic() - t0)
    return ShardResult([json.loads(json.dumps(stats))], quality)


def shard_task(job: ShardJob, trained: Any, spec: SliceSpec) -> ShardResult:
    """The engine's task: one slice -> one shard file. ``trained``: the trained index's bytes, or a
    :class:`retrieval.engine.Shared` holding them."""
    return build_shard(job, trained.value if hasattr(trained, "value") else trained, spec)
