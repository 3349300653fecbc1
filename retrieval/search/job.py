"""The bulk two-stage search job (``retrieval search``): plan, run locally or on Spark, commit.

Work units, the same in both engines:

- a **query chunk** is up to ``search.query_chunk`` consecutive rows of one query feature file;
  it is the unit of memory (its ``nq x S`` shortlist) and of output (``part-NNNNN.parquet`` with
  NNNNN = chunk number);
- :func:`coarse_task` searches a group of up to ``search.shard_cache`` index shards for one chunk
  (the shards come from a per-process cache, so an executor loads each once; the chunk's IVF cells
  are assigned once for all of them, :func:`chunk_assignment`) and returns each shard's local
  top K' (``search.shard_shortlist``);
- :func:`chunk_task` merges the per-shard lists of one chunk into the global top S
  (:func:`~retrieval.search.coarse.merge_shortlists`), reranks them exactly in 512-d
  (:func:`~retrieval.search.rerank.rerank`), maps ids back to ``image_id``/``uri`` and writes the
  chunk's part file atomically.

Spark: when every shard fits one task's shard cache, one task per chunk runs both (no shuffle);
otherwise one task per (shard group x chunk), group-major so consecutive tasks reuse the cached
shards, their outputs shuffled by chunk (``partitionBy``) to one task per chunk. The local path
runs the same two functions in a loop. ``_manifest.json`` is removed when a run starts and
written when it ends: its presence means the output is complete.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import faults, fsio, integrity
from retrieval.index import idmap
from retrieval.schema import RESULT_SCHEMA, coarse_matrix, conform_results, fine_matrix
from retrieval.search import blocks as blocks_mod
from retrieval.search import coarse as coarse_mod
from retrieval.search import normalize as normalize_mod
from retrieval.search import queries as q_mod
from retrieval.search import rerank as rerank_mod
from retrieval.search import vectors
from retrieval.search.queries import Chunk
from retrieval.sparkutil import task_threads

log = logging.getLogger(__name__)
MANIFEST = "_manifest.json"
QUERY_FEATURES = "query_features"

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
    threads: int = 0
    verify: bool = True
    feature_versions: tuple[str | None, ...] | None = None
    chunks: tuple[Chunk, ...] = field(default_factory=tuple)
    faults: dict | None = None
    storage_options: dict | None = None
    background: normalize_mod.Background | None = None   # score normalisation (None: off)
    rerank: str = "chunk"             # chunk-major or gallery-major rerank (resolved, see blocks.py)
    blocks: tuple[blocks_mod.Block, ...] = field(default_factory=tuple)   # gallery-major: the blocks


def part_name(chunk: int) -> str:
    return f"part-{chunk:05d}.parquet"


def _set_threads(job: SearchJob) -> None:
    """Per-task process setup: faiss threads, fsspec storage options."""
    import faiss

    fsio.configure(job.storage_options)
    faiss.omp_set_num_threads(task_threads(job.threads))


def load_shard(job: SearchJob, shard_no: int):
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
    seconds)``. The chunk's cells are assigned once (the shards share one quantizer)."""
    t0 = time.monotonic()
    _set_threads(job)
    threads = task_threads(job.threads)
    k = job.shard_shortlist or job.shortlist
    out = []
    for shard_no in shard_nos:
        index = load_shard(job, shard_no)
        a = chunk_assignment(job, chunk, index)
        scores, ids = coarse_mod.search_shard(index, None, k, assignment=a, threads=threads)
        out.append((shard_no, scores, ids))
    return out, time.monotonic() - t0


def _query_table(job: SearchJob, chunk: Chunk) -> pa.Table:
    return query_rows(job, chunk, ["image_id", "uri", "fine"] + (["fine_scale"] if job.query_int8 else []))


def _cache(job: SearchJob) -> vectors.VectorCache:
    cache = vectors.process_cache(job.vector_cache_mb)
    cache.threads = task_threads(job.threads)
    return cache


def chunk_task(job: SearchJob, chunk: Chunk, parts: Sequence[tuple[np.ndarray, np.ndarray]],
               coarse_s: float = 0.0, shuffle_bytes: int = 0) -> dict:
    """Chunk-major rerank: merge the shards' lists of one chunk (``parts`` in shard order),
    rerank through the process's vector cache, write its part file; returns the chunk's stats."""
    _set_threads(job)
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


def _write_chunk(job: SearchJob, chunk: Chunk, q: pa.Table, q_fine: np.ndarray, scores: np.ndarray,
                 ids: np.ndarray, coarse: np.ndarray, cache: vectors.VectorCache, stats: dict,
                 labels: tuple[pa.Array, pa.Array] | None = None) -> dict:
    """Normalise (when configured), map ids to labels, write the chunk's part file atomically;
    returns ``stats`` completed with the chunk's counts and write figures."""
    t2 = time.monotonic()
    norm = normalize_mod.normalized(scores, q_fine, job.background) if job.background is not None else None
    t_norm = time.monotonic() - t2
    faults.maybe_fail(job.faults, "search", chunk.chunk, chunk.stop - chunk.start)
    labels_before = cache.label_reads
    table = result_table(job, q, scores, ids, coarse, cache, norm, labels)
    url = fsio.join(job.output, part_name(chunk.chunk))
    with fsio.atomic_open(url, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
    t3 = time.monotonic()
    n_with = int((ids[:, 0] >= 0).sum()) if ids.size else 0
    return {"chunk": chunk.chunk, "file": part_name(chunk.chunk), "rows": table.num_rows,
            "sha256": fsio.sha256_file(url), "queries": chunk.stop - chunk.start,
            "queries_with_results": n_with, **stats,
            "gallery_label_row_groups_read": cache.label_reads - labels_before, "pid": os.getpid(),
            "attempt": faults.attempt(), "normalize_s": round(t_norm, 4),
            "write_s": round(t3 - t2 - t_norm, 4)}


# ---------------------------------------------------------------------------------------------
# the gallery-major rerank's task bodies (blocks.py): merge + route, block, finish
def merge_route(job: SearchJob, chunk: Chunk, parts: Sequence[tuple[np.ndarray, np.ndarray]],
                coarse_s: float = 0.0, shuffle_bytes: int = 0, merge_s: float = 0.0
                ) -> list[tuple[int, blocks_mod.Routed]]:
    """Merge the shards' lists of one chunk into its global top S, then split its pairs by
    gallery block: ``(block, Routed)`` records (and the chunk's figures, to one block)."""
    _set_threads(job)
    faults.maybe_fail(job.faults, "search", chunk.chunk, 0)
    t0 = time.monotonic()
    c_scores, c_ids = coarse_mod.merge_shortlists(parts, job.shortlist, job.coarse_threshold)
    meta = {"chunks": len(job.chunks), "coarse_s": round(coarse_s, 4), "merge_s": 0.0,
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
    _set_threads(job)
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
                                 job.shortlist, job.k, query_fine, cache.threads, cache)


def select_chunk(job: SearchJob, chunk: Chunk, pieces: Iterable[blocks_mod.Piece]) -> list[tuple[int, Any]]:
    """The chunk's scored pairs from every block back in its shortlist and the rerank's selection;
    its result ids go to their blocks for their labels (``(block, LabelAsk)``), the selection and the
    chunk's figures to one block, passed on to the chunk's writer (``(block, Selected)``)."""
    _set_threads(job)
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
             "blocks": block_meta}
    selected = blocks_mod.Selected(chunk.chunk, scores, top_ids, coarse, stats)
    return records + [(chunk.chunk % len(job.blocks), selected)]


def label_task(job: SearchJob, block_no: int, items: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    """The labels of the result rows whose gallery ids lie in one block (its label groups read once)."""
    _set_threads(job)
    return blocks_mod.label_task(block_no, items, job.feature_files, job.feature_versions, _cache(job),
                                 len(job.chunks))


def write_task(job: SearchJob, chunk: Chunk, items: Iterable[Any]) -> dict:
    """The chunk's selection and its result rows' labels from the blocks: normalise, write."""
    _set_threads(job)
    items = list(items)
    selected = [it for it in items if isinstance(it, blocks_mod.Selected)]
    if len(selected) != 1:
        raise RuntimeError(f"chunk {chunk.chunk}: {len(selected)} selections arrived, expected 1")
    sel = selected[0]
    pieces = [it for it in items if isinstance(it, blocks_mod.Labels)]
    label_meta = [p.meta["label_block"] for p in pieces if p.meta is not None]
    labels = blocks_mod.assemble_labels(pieces, int((sel.ids >= 0).sum()))
    q = _query_table(job, chunk)
    stats = {**sel.stats, "query_fine_bytes_read": _fine_bytes(q),
             "shuffle_bytes": sel.stats["shuffle_bytes"] + sum(
                 p.pos.nbytes + p.image_id.nbytes + p.uri.nbytes for p in pieces if p.meta is None),
             "blocks": sel.stats["blocks"] + label_meta}
    return _write_chunk(job, chunk, q, fine_matrix(q), sel.scores, sel.ids, sel.coarse, _cache(job), stats,
                        labels)


def gallery_labels(job: SearchJob, gids: np.ndarray, cache: vectors.VectorCache | None = None
                   ) -> tuple[pa.Array, pa.Array]:
    """``image_id`` and ``uri`` of gallery ids (in the order given), through the process's cache
    of row groups: each group is read once per process, not once per chunk."""
    cache = cache if cache is not None else vectors.process_cache(job.vector_cache_mb)
    files, rows = idmap.decode_ids(gids)
    order = np.argsort(files, kind="stable")
    bounds = np.flatnonzero(np.r_[True, files[order][1:] != files[order][:-1], True]) if len(gids) else []
    id_parts, uri_parts, pos_parts = [], [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        pos = order[a:b]
        f = int(files[pos[0]])
        if f < 0 or f >= len(job.feature_files):
            raise KeyError(f"id refers to feature file #{f}, the index has {len(job.feature_files)}")
        uniq, inverse = np.unique(rows[pos], return_inverse=True)
        version = job.feature_versions[f] if job.feature_versions is not None else None
        ids_f, uris_f = cache.labels(job.feature_files[f], uniq, version)
        take = pa.array(inverse.astype(np.int64))
        id_parts.append(ids_f.take(take))
        uri_parts.append(uris_f.take(take))
        pos_parts.append(pos)
    if not id_parts:
        return pa.array([], pa.string()), pa.array([], pa.string())
    back = np.empty(len(gids), np.int64)
    back[np.concatenate(pos_parts)] = np.arange(len(gids))
    back_arr = pa.array(back)
    return pa.concat_arrays(id_parts).take(back_arr), pa.concat_arrays(uri_parts).take(back_arr)


def result_table(job: SearchJob, queries: pa.Table, scores: np.ndarray, ids: np.ndarray,
                 coarse: np.ndarray, cache: vectors.VectorCache | None = None,
                 norm: np.ndarray | None = None, labels: tuple[pa.Array, pa.Array] | None = None) -> pa.Table:
    """Rows (query, rank) for every kept match, in query order then rank; the gallery labels
    looked up through ``cache`` unless given (``labels``: in that row order)."""
    rows, ranks = np.nonzero(ids >= 0)
    gids = ids[rows, ranks]
    gallery_id, gallery_uri = labels if labels is not None else gallery_labels(job, gids, cache)
    take = pa.array(rows.astype(np.int64))
    return pa.table({
        "query_id": queries.column("image_id").take(take),
        "rank": pa.array((ranks + 1).astype(np.int32)),
        "gallery_id": gallery_id,
        "score": pa.array(scores[rows, ranks].astype(np.float32)),
        "coarse_score": pa.array(coarse[rows, ranks].astype(np.float32)),
        "query_uri": queries.column("uri").take(take),
        "gallery_uri": gallery_uri,
        "norm_score": (pa.nulls(len(rows), pa.float32()) if norm is None
                       else pa.array(norm[rows, ranks].astype(np.float32))),
    }, schema=RESULT_SCHEMA)


# ---------------------------------------------------------------------------------------------
# engines
def _local_shortlists(job: SearchJob) -> Iterator[tuple[Chunk, list, float, float, int]]:
    """Per chunk: ``(chunk, shard lists to merge, coarse s, merge s so far, shuffle bytes)``. One
    group of shards (all fit the shard cache): chunk by chunk (memory of one chunk). Several:
    group-major, each group loaded once and searched for every chunk, folded into running
    per-chunk shortlists (``queries x S`` in memory); the shuffle bytes are those the Spark
    plan moves (every group's lists)."""
    from retrieval.progress import Progress

    groups = shard_groups(job)
    if len(groups) == 1:
        for c in job.chunks:
            parts, secs = coarse_task(job, range(job.n_shards), c)
            yield c, [(s, i) for _, s, i in parts], secs, 0.0, 0
        return
    running: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    figures = {c.chunk: [0.0, 0.0, 0] for c in job.chunks}     # coarse s, merge s, shuffle bytes
    progress = Progress("search coarse", total=len(groups) * len(job.chunks), unit="tasks")
    for group in groups:
        for c in job.chunks:
            parts, secs = coarse_task(job, group, c)
            t = time.monotonic()
            prev = running.get(c.chunk)
            lists = ([prev] if prev is not None else []) + [(s, i) for _, s, i in parts]
            running[c.chunk] = coarse_mod.merge_shortlists(lists, job.shortlist, job.coarse_threshold)
            f = figures[c.chunk]
            f[0] += secs
            f[1] += time.monotonic() - t
            f[2] += sum(s.nbytes + i.nbytes for _, s, i in parts)
            progress.update(1)
    progress.finish()
    for c in job.chunks:
        f = figures[c.chunk]
        yield c, [running.pop(c.chunk)], f[0], f[1], f[2]


def run_local(job: SearchJob) -> list[dict]:
    """The Spark plan's task bodies in a loop. Chunk-major: each chunk merged, reranked, written
    in turn. Gallery-major: every chunk merged and routed, then each block scored (read once),
    then each chunk assembled and written (the routed pairs of all chunks in memory)."""
    from retrieval.progress import Progress

    progress = Progress("search", total=len(job.chunks), unit="chunks")
    stats: list[dict] = []
    by_block: dict[int, list[blocks_mod.Routed]] = {}
    for c, parts, coarse_s, merge_s, shuffled in _local_shortlists(job):
        if job.rerank == "chunk":
            st = chunk_task(job, c, parts, coarse_s, shuffled)
            st["merge_s"] = round(st["merge_s"] + merge_s, 4)
            stats.append(st)
        else:
            for b, r in merge_route(job, c, parts, coarse_s, shuffled, merge_s):
                by_block.setdefault(b, []).append(r)
        progress.update(1)
    progress.finish()
    if job.rerank == "chunk":
        return stats
    by_chunk = _local_stage(job, "search rerank", by_block, block_task)
    for c in job.chunks:
        for b, r in select_chunk(job, c, by_chunk.pop(c.chunk, [])):
            by_block.setdefault(b, []).append(r)
    by_chunk = _local_stage(job, "search labels", by_block, label_task)
    return [write_task(job, c, by_chunk.pop(c.chunk, [])) for c in job.chunks]


def _local_stage(job: SearchJob, label: str, by_block: dict[int, list], task) -> dict[int, list]:
    """One gallery-major stage in the local engine: ``task`` over every block's records (consumed),
    its output records gathered by chunk."""
    from retrieval.progress import Progress

    by_chunk: dict[int, list] = {}
    progress = Progress(label, total=len(job.blocks), unit="blocks")
    for b in range(len(job.blocks)):
        for c, rec in task(job, b, by_block.pop(b, [])):
            by_chunk.setdefault(c, []).append(rec)
        progress.update(1)
    progress.finish()
    return by_chunk


def _coarse_records(job: SearchJob, task: tuple[int, int]) -> list[tuple[int, tuple]]:
    group_no, chunk_no = task
    parts, secs = coarse_task(job, shard_groups(job)[group_no], job.chunks[chunk_no])
    return [(chunk_no, (shard_no, s, i, secs / len(parts))) for shard_no, s, i in parts]


def _chunk_lists(job: SearchJob, records: Iterable[tuple[int, tuple]]
                 ) -> Iterator[tuple[Chunk, list, float, int]]:
    """The shuffled shard lists of each chunk: ``(chunk, lists in shard order, coarse s, bytes)``."""
    by_chunk: dict[int, dict[int, tuple]] = {}
    for chunk_no, (shard_no, s, i, secs) in records:
        by_chunk.setdefault(chunk_no, {})[shard_no] = (s, i, secs)
    for chunk_no, shards in sorted(by_chunk.items()):
        if sorted(shards) != list(range(job.n_shards)):
            raise RuntimeError(f"chunk {chunk_no}: results of shards {sorted(shards)} arrived, "
                               f"expected all {job.n_shards}")
        parts = [(shards[n][0], shards[n][1]) for n in range(job.n_shards)]
        yield (job.chunks[chunk_no], parts, sum(v[2] for v in shards.values()),
               sum(s.nbytes + i.nbytes for s, i in parts))


def _chunk_partition(job: SearchJob, records: Iterable[tuple[int, tuple]]) -> Iterator[dict]:
    for chunk, parts, secs, shuffled in _chunk_lists(job, records):
        yield chunk_task(job, chunk, parts, secs, shuffled)


def _route_partition(job: SearchJob, records: Iterable[tuple[int, tuple]]) -> Iterator[tuple]:
    for chunk, parts, secs, shuffled in _chunk_lists(job, records):
        yield from merge_route(job, chunk, parts, secs, shuffled)


def _fused_task(job: SearchJob, chunk_no: int) -> dict:
    """One chunk end to end (every shard, merge, rerank, write): the plan when all shards fit
    in one task's shard cache, so no shortlist is shuffled."""
    chunk = job.chunks[chunk_no]
    parts, secs = coarse_task(job, range(job.n_shards), chunk)
    return chunk_task(job, chunk, [(s, i) for _, s, i in parts], secs)


def _fused_route(job: SearchJob, chunk_no: int) -> list[tuple[int, blocks_mod.Routed]]:
    chunk = job.chunks[chunk_no]
    parts, secs = coarse_task(job, range(job.n_shards), chunk)
    return merge_route(job, chunk, [(s, i) for _, s, i in parts], secs)


def _block_partition(job: SearchJob, index: int, records: Iterable[tuple]) -> Iterator[tuple]:
    return block_task(job, index, (r for _, r in records))


def _select_partition(job: SearchJob, index: int, records: Iterable[tuple]) -> list[tuple]:
    return select_chunk(job, job.chunks[index], (p for _, p in records))


def _label_partition(job: SearchJob, index: int, records: Iterable[tuple]) -> Iterator[tuple]:
    return label_task(job, index, (r for _, r in records))


def _write_partition(job: SearchJob, index: int, records: Iterable[tuple]) -> Iterator[dict]:
    yield write_task(job, job.chunks[index], (r for _, r in records))


def run_spark(spark, job: SearchJob, progress_seconds: float = 10.0) -> list[dict]:
    """Up to ``shard_cache`` shards: one task per chunk searches every shard and merges
    (:func:`_fused_task`). More: one coarse task per (shard group x chunk), group-major so
    consecutive tasks reuse the cached shards, their per-shard lists shuffled by chunk
    (``partitionBy``) to one merge task per chunk. Chunk-major: that task also reranks and writes.
    Gallery-major: it routes the pairs to one task per gallery block (shuffle), whose kept pairs
    go to one task per chunk (shuffle) that selects and writes."""
    from retrieval.sparkutil import ProgressMonitor

    sc = spark.sparkContext
    n_chunks = len(job.chunks)
    groups = shard_groups(job)
    chunk_major = job.rerank == "chunk"
    if len(groups) == 1:
        base = sc.parallelize(range(n_chunks), n_chunks)
        rdd = base.map(functools.partial(_fused_task, job)) if chunk_major \
            else base.flatMap(functools.partial(_fused_route, job))
        total = n_chunks
    else:
        tasks = [(g, c) for g in range(len(groups)) for c in range(n_chunks)]   # group-major
        lists = sc.parallelize(tasks, len(tasks)).flatMap(functools.partial(_coarse_records, job)) \
            .partitionBy(n_chunks, lambda c: c)
        rdd = lists.mapPartitions(functools.partial(_chunk_partition if chunk_major else _route_partition, job))
        total = len(tasks) + n_chunks
    if not chunk_major:        # block scoring, selection, label lookups by block, writing by chunk
        for stage, n in ((_block_partition, len(job.blocks)), (_select_partition, n_chunks),
                         (_label_partition, len(job.blocks)), (_write_partition, n_chunks)):
            rdd = rdd.partitionBy(n, lambda key: key).mapPartitionsWithIndex(functools.partial(stage, job))
        total += 2 * (len(job.blocks) + n_chunks)
    with ProgressMonitor(spark, "search", total_tasks=total, every=progress_seconds):
        return rdd.collect()


# ---------------------------------------------------------------------------------------------
def _clean_output(output_url: str) -> None:
    """Remove the manifest first (the output is incomplete from now on), then old result parts."""
    fs, root = fsio.url_to_fs(output_url)
    root = root.rstrip("/")
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm(f"{root}/{MANIFEST}")
    for p in fs.glob(f"{root}/part-*.parquet") + fs.glob(f"{root}/.tmp-*"):
        fs.rm(p)


def verify_index_inputs(index_url: str, index_manifest: dict, spark=None, storage_options=None) -> None:
    """Every file the index manifest lists (trained part, shards, gallery feature files) against its
    sha256, hashed once per run in parallel, before anything is written: a clear error naming the
    file on both engines (tasks verify the shards they load again, as they read them anyway)."""
    from retrieval.index import store

    where = fsio.join(index_url, store.MANIFEST)
    index_files = [(fsio.join(index_url, fsio.safe_relpath(e["file"])), e.get("sha256"))
                   for e in [index_manifest["trained"], *index_manifest["shards"]]]
    integrity.verify_files(index_files, "index file", where, spark, storage_options)
    integrity.verify_files([(f["url"], f.get("sha256")) for f in index_manifest["feature_files"]],
                           "gallery feature file", where, spark, storage_options)


def plan_rerank(job: SearchJob, configured: str) -> tuple[SearchJob, dict]:
    """The rerank's plan: ``chunk``-major, or ``gallery``-major over blocks of at most
    ``vector_cache_mb`` of decoded fine vectors (one row group at least); ``auto`` picks gallery-major when
    there are several chunks and the gallery's fine column does not fit the vector cache (each
    chunk would read it again). Also the column's size (stored and decoded bytes), from the
    feature files' footers."""
    import dataclasses

    footers = vectors.VectorCache(0)
    blocks = blocks_mod.plan_blocks(footers, job.feature_files, job.feature_versions,
                                    job.feature_rows if job.verify else None,
                                    job.vector_cache_mb << 20)
    column = {"stored": 0, "decoded": 0}
    for f, url in enumerate(job.feature_files):
        ft = footers.footer(url, job.feature_versions[f] if job.feature_versions is not None else None)
        column["stored"] += int(ft.stored.sum())
        column["decoded"] += ft.num_rows * ft.row_bytes
    mode = configured
    if mode == "auto":
        mode = "gallery" if len(job.chunks) > 1 and column["decoded"] > job.vector_cache_mb << 20 else "chunk"
    return dataclasses.replace(job, rerank=mode, blocks=tuple(blocks) if mode == "gallery" else ()), column


def io_counts(stats: list[dict], block_stats: list[dict], column: dict) -> dict:
    """The run's reads of gallery fine vectors (row groups, stored and decoded bytes; against the
    column's size), of gallery labels and query vectors, and the bytes its plan shuffles (numpy
    payload of the records moved between tasks: Spark adds framing and compression)."""
    def total(key: str, rows: list[dict]) -> int:
        return int(sum(r.get(key, 0) for r in rows))

    fine_read = total("gallery_fine_bytes_read", stats) + total("bytes_read", block_stats)
    return {
        "gallery_fine_column_bytes": column["stored"], "gallery_fine_column_decoded_bytes": column["decoded"],
        "gallery_fine_row_groups_read": total("gallery_row_groups_read", stats) + total("row_groups", block_stats),
        "gallery_fine_bytes_read": fine_read,
        "gallery_fine_bytes_decoded": total("gallery_fine_bytes_decoded", stats) + total("bytes_decoded", block_stats),
        "gallery_fine_reads_per_column": round(fine_read / column["stored"], 3) if column["stored"] else None,
        "gallery_label_row_groups_read": total("gallery_label_row_groups_read", stats)
        + total("label_row_groups", block_stats),
        "gallery_label_bytes_read": total("label_bytes_read", block_stats) or None,
        "query_fine_bytes_read": total("query_fine_bytes_read", stats) + total("query_bytes_read", block_stats),
        "shuffle_bytes": total("shuffle_bytes", stats) + total("shuffle_bytes", block_stats),
        "pairs_scored": total("pairs", block_stats) or None,
        "pairs_shuffled_back": total("pairs_kept", block_stats) or None,
    }


def resolve_shortlist(configured: int, index_manifest: dict) -> int:
    """``search.shortlist``, or for 0 the size-dependent default of
    :func:`~retrieval.search.coarse.auto_shortlist` from the index's vector count."""
    if configured > 0:
        return int(configured)
    ntotal = index_manifest.get("ntotal") or sum(int(s.get("ntotal", 0)) for s in index_manifest["shards"])
    return coarse_mod.auto_shortlist(int(ntotal))


def search(queries_url: str, index_url: str, output_url: str, cfg, spark=None) -> dict:
    """Run the two-stage search; returns the manifest. ``spark=None`` runs locally (no JVM)."""
    from retrieval.index import store

    t0 = time.monotonic()
    sc = cfg.search
    fsio.configure(cfg["io.storage_options"])
    fsio.ensure_writable(output_url)
    index_manifest = store.read_index_manifest(index_url)
    # before anything is written: a background of another model is an error, not an empty output
    background = normalize_mod.load_background(sc.normalize, index_manifest,
                                               list(store.feature_file_urls(index_manifest)))
    if sc.verify:
        verify_index_inputs(index_url, index_manifest, spark, cfg["io.storage_options"])
    _clean_output(output_url)
    qf_url, qman, encode_s = q_mod.resolve_queries(queries_url, output_url, index_url, index_manifest,
                                                   cfg, spark)
    qfiles, qrows = q_mod.query_files(qf_url, qman, sc.verify)
    chunks = q_mod.plan_chunks(qrows, sc.query_chunk)
    ffiles = index_manifest["feature_files"]
    shortlist, n_shards = resolve_shortlist(sc.shortlist, index_manifest), len(index_manifest["shards"])
    job = SearchJob(
        output=output_url, index_url=index_url, index_manifest=index_manifest,
        query_files=tuple(qfiles), query_int8=qman.get("storage") == "int8",
        feature_files=tuple(store.feature_file_urls(index_manifest)),
        feature_rows=tuple(f.get("rows") for f in ffiles),
        feature_versions=tuple(f.get("sha256") for f in ffiles), n_shards=n_shards,
        nprobe=int(sc.nprobe if sc.nprobe > 0 else index_manifest.get("nprobe", 1)),
        shortlist=shortlist, shard_shortlist=coarse_mod.shard_shortlist(shortlist, n_shards, sc.shard_shortlist),
        k=sc.k,
        coarse_threshold=sc.coarse_threshold,
        match_threshold=sc.match_threshold,
        vector_cache_mb=sc.vector_cache_mb, shard_cache=sc.shard_cache,
        threads=sc.threads, verify=sc.verify, chunks=tuple(chunks), faults=cfg["faults"].to_dict(),
        storage_options=cfg["io.storage_options"], background=background)
    job, column = plan_rerank(job, sc.rerank)
    log.info("search %s (%d queries in %d chunks) against %s (%d shards, nprobe %d, shortlist %d, "
             "%d per shard, k %d; %s-major rerank%s)", qf_url, sum(qrows), len(chunks), index_url, job.n_shards,
             job.nprobe, job.shortlist, job.shard_shortlist, job.k, job.rerank,
             f" over {len(job.blocks)} gallery blocks" if job.blocks else "")
    t1 = time.monotonic()
    if not chunks:
        stats = []
        url = fsio.join(output_url, part_name(0))
        with fsio.atomic_open(url, "wb") as fh:
            pq.write_table(RESULT_SCHEMA.empty_table(), fh)
        stats.append({"chunk": 0, "file": part_name(0), "rows": 0, "sha256": fsio.sha256_file(url),
                      "queries": 0, "queries_with_results": 0, "queries_with_shortlist": 0})
    elif spark is None:
        stats = run_local(job)
    else:
        stats = run_spark(spark, job, sc.progress_seconds)
    t_search = time.monotonic() - t1
    stats = sorted(stats, key=lambda s: s["chunk"])
    counts = {"queries": sum(qrows), "query_errors": int(qman.get("counts", {}).get("errors", 0)),
              "queries_with_results": sum(s["queries_with_results"] for s in stats),
              "queries_with_shortlist": sum(s["queries_with_shortlist"] for s in stats),
              "rows": sum(s["rows"] for s in stats), "chunks": len(chunks), "shards": job.n_shards}
    if sum(s["queries"] for s in stats) != counts["queries"]:
        raise AssertionError(f"chunks cover {sum(s['queries'] for s in stats)} queries, "
                             f"expected {counts['queries']}")
    by_block: dict[int, dict] = {}          # a block's scoring and label-lookup figures, one entry
    for b in (b for s in stats for b in s.pop("blocks", [])):
        by_block.setdefault(b["block"], {}).update(b)
    block_stats = [by_block[b] for b in sorted(by_block)]
    timings = {"encode_s": round(encode_s, 3)}
    for key in ("coarse_s", "merge_s", "rerank_s", "normalize_s", "write_s"):
        timings[key] = round(sum(s.get(key, 0.0) for s in stats), 3)
    timings["rerank_s"] = round(timings["rerank_s"] + sum(b.get("read_s", 0) + b.get("score_s", 0)
                                                          for b in block_stats), 3)
    if block_stats:
        timings["labels_s"] = round(sum(b.get("label_s", 0) for b in block_stats), 3)
    timings["search_s"] = round(t_search, 3)
    timings["total_s"] = round(time.monotonic() - t0, 3)
    timings["queries_per_s"] = round(counts["queries"] / t_search, 1) if t_search > 0 and counts["queries"] else None
    manifest = {
        "stage": "search", "model_version": index_manifest.get("model_version"),
        "index": index_url, "queries": queries_url, "query_features": qf_url, "output": output_url,
        "engine": "spark" if spark is not None else "local",
        "schema": RESULT_SCHEMA.to_string(), "counts": counts,
        "params": {"shortlist": job.shortlist, "shard_shortlist": job.shard_shortlist, "k": job.k,
                   "nprobe": job.nprobe, "shard_shortlist_configured": sc.shard_shortlist,
                   "coarse_threshold": job.coarse_threshold, "match_threshold": job.match_threshold,
                   "query_chunk": sc.query_chunk, "shortlist_configured": sc.shortlist,
                   "normalize": job.background.describe() if job.background is not None else None,
                   "rerank": job.rerank, "rerank_configured": sc.rerank, "blocks": len(job.blocks),
                   "vector_cache_mb": job.vector_cache_mb},
        "io": io_counts(stats, block_stats, column),
        "files": [{"file": s["file"], "sha256": s["sha256"], "rows": s["rows"], "chunk": s["chunk"],
                   "queries": s["queries"]} for s in stats],
        "chunks": [{k: v for k, v in s.items() if k not in ("file", "sha256")} for s in stats],
        "blocks": block_stats,
        "config": cfg.to_dict(), "timings": timings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fsio.write_json(fsio.join(output_url, MANIFEST), manifest)
    log.info("search done: %d queries, %d with results, %d rows in %.1fs -> %s", counts["queries"],
             counts["queries_with_results"], counts["rows"], timings["total_s"], output_url)
    return manifest


def read_results(output_url: str) -> pa.Table:
    """All result rows of a COMPLETE search output (files checked against the manifest)."""
    murl = fsio.join(output_url, MANIFEST)
    if not fsio.exists(murl):
        raise FileNotFoundError(f"{output_url} has no {MANIFEST}: not a (complete) search output")
    m = fsio.read_json(murl)
    if m.get("stage") != "search":
        raise ValueError(f"{murl}: stage is {m.get('stage')!r}, expected 'search'")
    tables = []
    for f in m.get("files", []):
        url = fsio.join(output_url, fsio.safe_relpath(f["file"]))
        if f.get("sha256") and fsio.sha256_file(url) != f["sha256"]:
            raise ValueError(f"result file {url} does not match the sha256 in {murl}")
        tables.append(conform_results(fsio.read_parquet(url)))
    return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()
