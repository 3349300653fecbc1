"""The search's task bodies, the same in both engines (the plan of :mod:`retrieval.search.flow` runs them).

- a **query chunk** is up to ``search.query_chunk`` consecutive rows of one query feature file;
  it is the unit of memory (its ``nq x S`` shortlist) and of output (``part-NNNNN.parquet`` with
  NNNNN = chunk number);
- :func:`coarse_task` searches a group of up to ``search.shard_cache`` index shards for one chunk
  (the shards come from a per-process cache, so an executor loads each once; the chunk's IVF cells
  are assigned once for all of them, :func:`chunk_assignment`) and returns each shard's local
  top K' (``search.shard_shortlist``);
- chunk-major rerank: :func:`chunk_task` merges the per-shard lists of one chunk into the global
  top S (:func:`~retrieval.search.coarse.merge_shortlists`), reranks them exactly in 512-d
  (:func:`~retrieval.search.rerank.rerank`), maps ids back to ``image_id``/``uri`` and writes the
  chunk's part file atomically;
- gallery-major rerank (:mod:`retrieval.search.blocks`): :func:`merge_route` (merge, then the
  pairs to their gallery blocks), :func:`block_task` (a block read once, its pairs scored),
  :func:`select_chunk` (the chunk's top k), :func:`label_task` (the result rows' labels by block),
  :func:`write_task` (the part file).
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import faults, fsio
from retrieval.index import idmap, takedowns
from retrieval.schema import REGION, RESULT_SCHEMA, coarse_matrix, fine_matrix
from retrieval.search import blocks as blocks_mod
from retrieval.search import calibrate
from retrieval.search import coarse as coarse_mod
from retrieval.search import listblocks
from retrieval.search import normalize as normalize_mod
from retrieval.search import regions as regions_mod
from retrieval.search import rerank as rerank_mod
from retrieval.search import vectors
from retrieval.search.queries import Chunk
from retrieval.engine import task_attempt, task_threads


@dataclass(frozen=True)
class SearchJob:
    """Plain, picklable values a task needs (shards are loaded on the executor, never shipped)."""
    output: str
    index_url: str
    index_manifest: dict
    query_files: tuple[str, ...]
    query_int8: bool
    feature_files: tuple[str, ...]
    feature_rows: tuple[int | None, ...]
    n_shards: int
    nprobe: int
    shortlist: int = 500
    shard_shortlist: int = 0          # K' per shard (resolved; 0 = shortlist)
    k: int = 10
    coarse_threshold: float | None = None
    match_threshold: float | None = None
    vector_cache_mb: int = 1024
    shard_cache: int = 2
    threads: int | str = "auto"     # a number or auto (the task's cores)
    verify: bool = True
    feature_versions: tuple[str | None, ...] | None = None
    chunks: tuple[Chunk, ...] = field(default_factory=tuple)
    faults: dict | None = None
    storage_options: dict | None = None
    background: normalize_mod.Background | None = None   # score normalisation (None: off)
    calibration: calibrate.NullTail | None = None        # false-match rates of norm_score (None: off)
    rerank: str = "chunk"             # chunk-major or gallery-major rerank (resolved, see blocks.py)
    blocks: tuple[blocks_mod.Block, ...] = field(default_factory=tuple)   # gallery-major: the blocks
    list_blocks: tuple = ()           # ... scored over the list-ordered fine copy (listblocks.py), or ()
    fine_copies: tuple[str, ...] = ()  # the copy of each shard (urls), with list_blocks
    removed: takedowns.Removed | None = None     # the index's tombstones (retrieval remove): left out
    query_regions: bool = False       # the query features hold region rows (merged per image when written)
    geometric: Any = None             # search.geometric: a geometric.Geometric (None: off)
    region_margin: float = 0.0        # search.region_margin: a region row's merge key minus this

    @property
    def scoring_blocks(self) -> int:
        """The gallery-major rerank's scoring blocks: ranges of IVF lists, or runs of feature-file row groups."""
        return len(self.list_blocks) or len(self.blocks)


def part_name(chunk: int) -> str:
    return f"part-{chunk:05d}.parquet"


def _configure_process(job: SearchJob) -> None:
    """Per-task process setup: faiss threads, fsspec storage options."""
    import faiss

    fsio.configure(job.storage_options)
    faiss.omp_set_num_threads(task_threads(job.threads))


def cached_shard(job: SearchJob, shard_no: int):
    """The searchable shard, from this process's cache (loaded and verified at most once)."""
    from retrieval.index import store

    entry = job.index_manifest["shards"][shard_no]
    key = (job.index_url, shard_no, entry.get("sha256"))
    index = coarse_mod.cached_shard(
        key, lambda: store.load_shard(job.index_url, shard_no, job.index_manifest, verify=job.verify),
        job.shard_cache)
    store.set_nprobe(index, job.nprobe)
    return index


def query_rows(job: SearchJob, chunk: Chunk, columns: Sequence[str]) -> pa.Table:
    ids = idmap.encode_ids(chunk.file_no, np.arange(chunk.start, chunk.stop))
    return idmap.fetch_rows(list(job.query_files), ids, columns)


def shard_groups(job: SearchJob) -> list[tuple[int, ...]]:
    """The shards a coarse task searches together: runs of ``shard_cache`` consecutive shards
    (the number an executor process keeps loaded), so one coarse assignment serves them all."""
    g = max(1, int(job.shard_cache))
    return [tuple(range(a, min(a + g, job.n_shards))) for a in range(0, job.n_shards, g)]


def chunk_assignment(job: SearchJob, chunk: Chunk, index) -> coarse_mod.Assignment:
    """The chunk's coarse assignment (IVF cells at ``job.nprobe``), from this process's cache."""
    key = (job.index_url, job.index_manifest["trained"].get("sha256"), job.query_files[chunk.file_no],
           chunk.start, chunk.stop, job.nprobe)
    return coarse_mod.cached_assignment(
        key, lambda: coarse_mod.assign(index, coarse_matrix(query_rows(job, chunk, ["coarse"]))))


# ---------------------------------------------------------------------------------------------
# the two task bodies
def coarse_task(job: SearchJob, shard_nos: Sequence[int], chunk: Chunk
                ) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], float]:
    """Shard-local top K' of one chunk for each of ``shard_nos``: ``([(shard, scores, ids)],
    seconds)``. The chunk's cells are assigned once (the shards share one quantizer). A shard with
    tombstones (``job.removed``) is asked for more (:func:`~retrieval.search.coarse.overfetch`) and
    its removed ids dropped before its list leaves the task."""
    t0 = time.monotonic()
    _configure_process(job)
    threads = task_threads(job.threads)
    k = job.shard_shortlist or job.shortlist
    out = []
    for shard_no in shard_nos:
        index = cached_shard(job, shard_no)
        a = chunk_assignment(job, chunk, index)
        dead = job.removed.in_shard(shard_no) if job.removed is not None else 0
        extra = coarse_mod.overfetch(k, dead, int(job.index_manifest["shards"][shard_no]["ntotal"])) if dead else 0
        scores, ids = coarse_mod.search_shard(index, None, k + extra, assignment=a, threads=threads)
        if dead:       # removed ids never leave the shard's task: its top K' among the live ones
            takedowns.drop_removed(scores, ids, job.removed.ids)
            scores, ids = coarse_mod.topk_rows(scores, ids, k, ordered=True)
        out.append((shard_no, scores, ids) if not job.list_blocks else
                   (shard_no, scores, ids, listblocks.shard_lists(job.index_url, shard_no, job.index_manifest, index,
                                                                  ids, job.shard_cache)))
    return out, time.monotonic() - t0


def _query_table(job: SearchJob, chunk: Chunk, fine: bool = True) -> pa.Table:
    cols = ["image_id", "uri"] + (["fine"] + (["fine_scale"] if job.query_int8 else []) if fine else [])
    return query_rows(job, chunk, cols + ([REGION] if job.query_regions else []))


def _cache(job: SearchJob) -> vectors.VectorCache:
    cache = vectors.process_cache(job.vector_cache_mb)
    cache.threads = task_threads(job.threads)
    return cache


def chunk_task(job: SearchJob, chunk: Chunk, parts: Sequence[tuple[np.ndarray, np.ndarray]],
               coarse_s: float = 0.0, shuffle_bytes: int = 0) -> dict:
    """Chunk-major rerank: merge the shards' lists of one chunk (``parts`` in shard order),
    rerank through the process's vector cache, write its part file; returns the chunk's stats."""
    _configure_process(job)
    faults.maybe_fail(job.faults, "search", chunk.chunk, 0)
    t0 = time.monotonic()
    c_scores, c_ids = coarse_mod.merge_shortlists(parts, job.shortlist, job.coarse_threshold)
    t1 = time.monotonic()
    q = _query_table(job, chunk)
    cache = _cache(job)
    before = (cache.reads, cache.bytes_read, cache.bytes_decoded)
    q_fine = fine_matrix(q)
    scores, ids, coarse = rerank_mod.rerank(
        q_fine, c_ids, c_scores, job.feature_files, job.k, job.match_threshold,
        job.feature_rows if job.verify else None, cache, job.feature_versions)
    stats = {"coarse_s": round(coarse_s, 4), "merge_s": round(t1 - t0, 4),
             "rerank_s": round(time.monotonic() - t1, 4),
             "queries_with_shortlist": int((c_ids >= 0).any(axis=1).sum()) if c_ids.size else 0,
             "gallery_row_groups_read": cache.reads - before[0],
             "gallery_fine_bytes_read": cache.bytes_read - before[1],
             "gallery_fine_bytes_decoded": cache.bytes_decoded - before[2],
             "query_fine_bytes_read": _fine_bytes(q), "shuffle_bytes": shuffle_bytes}
    return _write_chunk(job, chunk, q, q_fine, scores, ids, coarse, cache, stats)


def _fine_bytes(q: pa.Table) -> int:
    return sum(q.column(c).nbytes for c in ("fine", "fine_scale") if c in q.column_names)


def _write_chunk(job: SearchJob, chunk: Chunk, q: pa.Table, q_fine: np.ndarray | None, scores: np.ndarray,
                 ids: np.ndarray, coarse: np.ndarray, cache: vectors.VectorCache, stats: dict,
                 labels: tuple[pa.Array, pa.Array] | None = None) -> dict:
    """Normalise (when configured), map ids to labels, write the chunk's part file atomically;
    returns ``stats`` completed with the chunk's counts and write figures."""
    t2 = time.monotonic()
    norm = normalize_mod.normalized(scores, q_fine, job.background) if job.background is not None else None
    region = None
    if job.query_regions:       # each row normalised against the background on its own, then merged
        q, scores, ids, coarse, norm, region, labels = regions_mod.merge_chunk(q, scores, ids, coarse, norm,
                                                                              job.k, labels, job.region_margin)
    t_norm = time.monotonic() - t2
    faults.maybe_fail(job.faults, "search", chunk.chunk, chunk.stop - chunk.start)
    labels_before = cache.label_reads
    table = result_table(job, q, scores, ids, coarse, cache, norm, labels, region)
    if job.geometric is not None:        # local-feature verification of each query's top rows
        from retrieval.search.geometric import verify_table
        table, geo = verify_table(table, job.geometric)
        stats = {**stats, **geo}
    url = fsio.join(job.output, part_name(chunk.chunk))
    with fsio.atomic_open(url, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
    t3 = time.monotonic()
    n_with = int((ids[:, 0] >= 0).sum()) if ids.size else 0
    return {"chunk": chunk.chunk, "file": part_name(chunk.chunk), "rows": table.num_rows,
            "sha256": fsio.sha256_file(url), "queries": q.num_rows, "query_rows": chunk.stop - chunk.start,
            "queries_with_results": n_with, **stats,
            "gallery_label_row_groups_read": cache.label_reads - labels_before, "pid": os.getpid(),
            "attempt": task_attempt(), "normalize_s": round(t_norm, 4),
            "write_s": round(t3 - t2 - t_norm - stats.get("geometric_s", 0.0), 4)}


# ---------------------------------------------------------------------------------------------
# the gallery-major rerank's task bodies (blocks.py): merge + route, block, finish
def merge_route(job: SearchJob, chunk: Chunk, parts: Sequence[tuple[np.ndarray, np.ndarray]],
                coarse_s: float = 0.0, shuffle_bytes: int = 0, merge_s: float = 0.0
                ) -> list[tuple[int, blocks_mod.Routed]]:
    """Merge the shards' lists of one chunk into its global top S, then split its pairs by
    gallery block: ``(block, Routed)`` records (and the chunk's figures, to one block)."""
    _configure_process(job)
    faults.maybe_fail(job.faults, "search", chunk.chunk, 0)
    t0 = time.monotonic()
    c_scores, c_ids = coarse_mod.merge_shortlists(parts, job.shortlist, job.coarse_threshold)
    meta = {"coarse_s": round(coarse_s, 4), "merge_s": 0.0,
            "queries_with_shortlist": int((c_ids >= 0).any(axis=1).sum()) if c_ids.size else 0}
    records = list(blocks_mod.route(chunk.chunk, c_ids, c_scores, _block_map(job), meta))
    meta["merge_s"] = round(merge_s + time.monotonic() - t0, 4)
    meta["shuffle_bytes"] = shuffle_bytes + sum(r.pos.nbytes + r.gid.nbytes + r.coarse.nbytes for _, r in records)
    return records


@functools.lru_cache(maxsize=4)
def _block_map_of(blocks: tuple) -> blocks_mod.BlockMap:
    return blocks_mod.BlockMap(blocks)


def _block_map(job: SearchJob) -> blocks_mod.BlockMap:
    return _block_map_of(job.blocks)


def block_task(job: SearchJob, block_no: int, items: Iterable[blocks_mod.Routed]
               ) -> Iterator[tuple[int, blocks_mod.Piece]]:
    """Score the pairs routed to one gallery block (read once), each query's k best kept."""
    _configure_process(job)
    cache = _cache(job)

    def query_fine(chunk_no: int) -> tuple[np.ndarray, int]:
        chunk = job.chunks[chunk_no]

        def load():
            q = query_rows(job, chunk, ["fine"] + (["fine_scale"] if job.query_int8 else []))
            return fine_matrix(q), _fine_bytes(q)
        key = (job.query_files[chunk.file_no], chunk.start, chunk.stop)
        (vecs, nbytes), fresh = blocks_mod.cached_queries(key, load)
        return vecs, nbytes if fresh else 0

    return blocks_mod.block_task(job.blocks[block_no], items, job.feature_files, job.feature_versions,
                                 job.shortlist, job.k, query_fine, cache.threads, cache, len(job.chunks))


def select_chunk(job: SearchJob, chunk: Chunk, pieces: Iterable[blocks_mod.Piece]) -> list[tuple[int, Any]]:
    """The chunk's scored pairs from every block back in its shortlist and the rerank's selection;
    its result ids go to their blocks for their labels (``(block, LabelAsk)``), the selection and the
    chunk's figures to one block, passed on to the chunk's writer (``(block, Selected)``)."""
    _configure_process(job)
    t0 = time.monotonic()
    fine, ids, coarse_all, chunk_meta, block_meta = blocks_mod.assemble(pieces, chunk.stop - chunk.start,
                                                                         job.shortlist)
    if len(chunk_meta) != 1:
        raise RuntimeError(f"chunk {chunk.chunk}: {len(chunk_meta)} coarse-stage records arrived, expected 1")
    scores, top_ids, coarse = rerank_mod.select(fine, ids, coarse_all, job.k, job.match_threshold)
    meta = chunk_meta[0]
    rows, ranks = np.nonzero(top_ids >= 0)
    records: list[tuple[int, Any]] = list(blocks_mod.route_labels(chunk.chunk, top_ids[rows, ranks], _block_map(job)))
    stats = {"coarse_s": meta["coarse_s"], "merge_s": meta["merge_s"],
             "rerank_s": round(time.monotonic() - t0, 4),
             "queries_with_shortlist": meta["queries_with_shortlist"],
             "gallery_row_groups_read": 0, "gallery_fine_bytes_read": 0, "gallery_fine_bytes_decoded": 0,
             "shuffle_bytes": meta["shuffle_bytes"] + sum(r.pos.nbytes + r.gid.nbytes for _, r in records),
             "blocks": block_meta, **{k: meta[k] for k in ("query_fine_bytes_read", "query_shuffle_bytes") if k in meta}}
    selected = blocks_mod.Selected(chunk.chunk, scores, top_ids, coarse, stats)
    return records + [(chunk.chunk % len(job.blocks), selected)]


def label_task(job: SearchJob, block_no: int, items: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    """The labels of the result rows whose gallery ids lie in one block (its label groups read once)."""
    _configure_process(job)
    return blocks_mod.label_task(block_no, items, job.feature_files, job.feature_versions, _cache(job),
                                 len(job.chunks))


def write_task(job: SearchJob, chunk: Chunk, items: Iterable[Any]) -> dict:
    """The chunk's selection and its result rows' labels from the blocks: normalise, write."""
    _configure_process(job)
    items = list(items)
    selected = [it for it in items if isinstance(it, blocks_mod.Selected)]
    if len(selected) != 1:
        raise RuntimeError(f"chunk {chunk.chunk}: {len(selected)} selections arrived, expected 1")
    sel = selected[0]
    pieces = [it for it in items if isinstance(it, blocks_mod.Labels)]
    label_meta = [p.meta["label_block"] for p in pieces if p.meta is not None]
    labels = blocks_mod.assemble_labels(pieces, int((sel.ids >= 0).sum()))
    # the query vectors only for the score normalisation (the blocks scored the pairs)
    q = _query_table(job, chunk, fine=job.background is not None)
    stats = {**sel.stats, "query_fine_bytes_read": sel.stats.get("query_fine_bytes_read", 0) + _fine_bytes(q),
             "shuffle_bytes": sel.stats["shuffle_bytes"] + sum(
                 p.pos.nbytes + p.image_id.nbytes + p.uri.nbytes for p in pieces if p.meta is None),
             "blocks": sel.stats["blocks"] + label_meta}
    q_fine = fine_matrix(q) if job.background is not None else None
    return _write_chunk(job, chunk, q, q_fine, sel.scores, sel.ids, sel.coarse, _cache(job), stats, labels)


def gallery_labels(job: SearchJob, gids: np.ndarray, cache: vectors.VectorCache | None = None
                   ) -> tuple[pa.Array, pa.Array]:
    """``image_id`` and ``uri`` of gallery ids (in the order given), through the process's cache
    of row groups: each group is read once per process, not once per chunk."""
    cache = cache if cache is not None else vectors.process_cache(job.vector_cache_mb)
    return vectors.lookup_labels(gids, job.feature_files, job.feature_versions, cache)


def result_table(job: SearchJob, queries: pa.Table, scores: np.ndarray, ids: np.ndarray,
                 coarse: np.ndarray, cache: vectors.VectorCache | None = None,
                 norm: np.ndarray | None = None, labels: tuple[pa.Array, pa.Array] | None = None,
                 region: pa.Array | None = None) -> pa.Table:
    """Rows (query, rank) for every kept match, in query order then rank; the gallery labels
    looked up through ``cache`` unless given (``labels``, and ``region``, the query region of
    each match: in that row order)."""
    rows, ranks = np.nonzero(ids >= 0)
    gids = ids[rows, ranks]
    gallery_id, gallery_uri = labels if labels is not None else gallery_labels(job, gids, cache)
    take = pa.array(rows.astype(np.int64))
    n = len(rows)
    kept_norm = norm[rows, ranks] if norm is not None else None
    fmr = fmr_query = pa.nulls(n, pa.float64())
    if kept_norm is not None and job.calibration is not None:
        fmr = pa.array(job.calibration.fmr(kept_norm), pa.float64())
        fmr_query = pa.array(job.calibration.fmr_query(kept_norm), pa.float64())
    return pa.table({
        "query_id": queries.column("image_id").take(take),
        "rank": pa.array((ranks + 1).astype(np.int32)),
        "gallery_id": gallery_id,
        "score": pa.array(scores[rows, ranks].astype(np.float32)),
        "coarse_score": pa.array(coarse[rows, ranks].astype(np.float32)),
        "query_uri": queries.column("uri").take(take),
        "gallery_uri": gallery_uri,
        "norm_score": (pa.nulls(n, pa.float32()) if kept_norm is None else pa.array(kept_norm.astype(np.float32))),
        "fmr": fmr, "fmr_query": fmr_query, "query_region": pa.nulls(n, pa.string()) if region is None else region,
        "signal": pa.array(["descriptor"] * n, pa.string()), "distance": pa.nulls(n, pa.int32()),
        "inliers": pa.nulls(n, pa.int32()), "geometric_error": pa.nulls(n, pa.string()),
    }, schema=RESULT_SCHEMA)
