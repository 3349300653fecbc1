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
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import faults, fsio, integrity
from retrieval.index import idmap
from retrieval.schema import RESULT_SCHEMA, coarse_matrix, conform_results, fine_matrix
from retrieval.search import coarse as coarse_mod
from retrieval.search import normalize as normalize_mod
from retrieval.search import rerank as rerank_mod
from retrieval.search import vectors
from retrieval.sparkutil import task_threads

log = logging.getLogger(__name__)
MANIFEST = "_manifest.json"
QUERY_FEATURES = "query_features"

@dataclass(frozen=True)
class Chunk:
    chunk: int
    file_no: int      # index into SearchJob.query_files
    start: int        # first row in that file
    stop: int         # one past the last row


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


def chunk_task(job: SearchJob, chunk: Chunk, parts: Sequence[tuple[np.ndarray, np.ndarray]],
               coarse_s: float = 0.0) -> dict:
    """Merge the shards' lists of one chunk (``parts`` in shard order), rerank, write its part
    file; returns the chunk's stats."""
    _set_threads(job)
    faults.maybe_fail(job.faults, "search", chunk.chunk, 0)
    t0 = time.monotonic()
    c_scores, c_ids = coarse_mod.merge_shortlists(parts, job.shortlist, job.coarse_threshold)
    t1 = time.monotonic()
    q = query_rows(job, chunk, ["image_id", "uri", "fine"] + (["fine_scale"] if job.query_int8 else []))
    cache = vectors.process_cache(job.vector_cache_mb)
    cache.threads = task_threads(job.threads)
    reads_before = cache.reads
    q_fine = fine_matrix(q)
    scores, ids, coarse = rerank_mod.rerank(
        q_fine, c_ids, c_scores, job.feature_files, job.k, job.match_threshold,
        job.feature_rows if job.verify else None, cache, job.feature_versions)
    t2 = time.monotonic()
    norm = normalize_mod.normalized(scores, q_fine, job.background) if job.background is not None else None
    t_norm = time.monotonic() - t2
    faults.maybe_fail(job.faults, "search", chunk.chunk, chunk.stop - chunk.start)
    table = result_table(job, q, scores, ids, coarse, cache, norm)
    url = fsio.join(job.output, part_name(chunk.chunk))
    with fsio.atomic_open(url, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
    t3 = time.monotonic()
    n_with = int((ids[:, 0] >= 0).sum()) if ids.size else 0
    return {"chunk": chunk.chunk, "file": part_name(chunk.chunk), "rows": table.num_rows,
            "sha256": fsio.sha256_file(url), "queries": chunk.stop - chunk.start,
            "queries_with_results": n_with,
            "queries_with_shortlist": int((c_ids >= 0).any(axis=1).sum()) if c_ids.size else 0,
            "gallery_row_groups_read": cache.reads - reads_before, "pid": os.getpid(),
            "attempt": faults.attempt(),
            "coarse_s": round(coarse_s, 4), "merge_s": round(t1 - t0, 4),
            "rerank_s": round(t2 - t1, 4), "normalize_s": round(t_norm, 4),
            "write_s": round(t3 - t2 - t_norm, 4)}


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
                 norm: np.ndarray | None = None) -> pa.Table:
    """Rows (query, rank) for every kept match, in query order then rank."""
    rows, ranks = np.nonzero(ids >= 0)
    gids = ids[rows, ranks]
    gallery_id, gallery_uri = gallery_labels(job, gids, cache)
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
def run_local(job: SearchJob) -> list[dict]:
    """One group of shards (all fit the shard cache): each chunk end to end, in turn. Several:
    group-major, each group loaded once and searched for every chunk, folding into the running
    per-chunk shortlists (``queries x S`` in memory); then each chunk is reranked and written."""
    from retrieval.progress import Progress

    groups = shard_groups(job)
    if len(groups) == 1:          # every shard stays loaded: chunk by chunk, memory of one chunk
        stats = []
        progress = Progress("search", total=len(job.chunks), unit="chunks")
        for c in job.chunks:
            stats.append(_fused_task(job, c.chunk))
            progress.update(1)
        progress.finish()
        return stats
    running: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    coarse_s: dict[int, float] = {c.chunk: 0.0 for c in job.chunks}
    merge_s: dict[int, float] = {c.chunk: 0.0 for c in job.chunks}
    progress = Progress("search coarse", total=len(groups) * len(job.chunks), unit="tasks")
    for group in groups:
        for c in job.chunks:
            parts, secs = coarse_task(job, group, c)
            coarse_s[c.chunk] += secs
            t = time.monotonic()
            prev = running.get(c.chunk)
            lists = ([prev] if prev is not None else []) + [(s, i) for _, s, i in parts]
            running[c.chunk] = coarse_mod.merge_shortlists(lists, job.shortlist, job.coarse_threshold)
            merge_s[c.chunk] += time.monotonic() - t
            progress.update(1)
    progress.finish()
    stats = []
    progress = Progress("search rerank", total=len(job.chunks), unit="chunks")
    for c in job.chunks:
        st = chunk_task(job, c, [running.pop(c.chunk)], coarse_s[c.chunk])
        st["merge_s"] = round(st["merge_s"] + merge_s[c.chunk], 4)
        stats.append(st)
        progress.update(1)
    progress.finish()
    return stats


def _coarse_records(job: SearchJob, task: tuple[int, int]) -> list[tuple[int, tuple]]:
    group_no, chunk_no = task
    parts, secs = coarse_task(job, shard_groups(job)[group_no], job.chunks[chunk_no])
    return [(chunk_no, (shard_no, s, i, secs / len(parts))) for shard_no, s, i in parts]


def _chunk_partition(job: SearchJob, records: Iterable[tuple[int, tuple]]) -> Iterator[dict]:
    by_chunk: dict[int, dict[int, tuple]] = {}
    for chunk_no, (shard_no, s, i, secs) in records:
        by_chunk.setdefault(chunk_no, {})[shard_no] = (s, i, secs)
    for chunk_no, shards in sorted(by_chunk.items()):
        if sorted(shards) != list(range(job.n_shards)):
            raise RuntimeError(f"chunk {chunk_no}: results of shards {sorted(shards)} arrived, "
                               f"expected all {job.n_shards}")
        parts = [(shards[n][0], shards[n][1]) for n in range(job.n_shards)]
        yield chunk_task(job, job.chunks[chunk_no], parts, sum(v[2] for v in shards.values()))


def _fused_task(job: SearchJob, chunk_no: int) -> dict:
    """One chunk end to end (every shard, merge, rerank, write): the plan when all shards fit
    in one task's shard cache, so no shortlist is shuffled."""
    chunk = job.chunks[chunk_no]
    parts, secs = coarse_task(job, range(job.n_shards), chunk)
    return chunk_task(job, chunk, [(s, i) for _, s, i in parts], secs)


def run_spark(spark, job: SearchJob, progress_seconds: float = 10.0) -> list[dict]:
    """Up to ``shard_cache`` shards: one task per chunk does everything (:func:`_fused_task`).
    More: one coarse task per (shard group x chunk), group-major so consecutive tasks reuse the
    cached shards, their per-shard lists shuffled by chunk (``partitionBy``) to one merge +
    rerank + write task per chunk."""
    from retrieval.sparkutil import ProgressMonitor

    sc = spark.sparkContext
    n_chunks = len(job.chunks)
    groups = shard_groups(job)
    if len(groups) == 1:
        rdd = sc.parallelize(range(n_chunks), n_chunks).map(functools.partial(_fused_task, job))
        total = n_chunks
    else:
        tasks = [(g, c) for g in range(len(groups)) for c in range(n_chunks)]   # group-major
        rdd = sc.parallelize(tasks, len(tasks)) \
            .flatMap(functools.partial(_coarse_records, job)) \
            .partitionBy(n_chunks, lambda c: c) \
            .mapPartitions(functools.partial(_chunk_partition, job))
        total = len(tasks) + n_chunks
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
    from retrieval.search import queries as q_mod

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
    log.info("search %s (%d queries in %d chunks) against %s (%d shards, nprobe %d, shortlist %d, "
             "%d per shard, k %d)", qf_url, sum(qrows), len(chunks), index_url, job.n_shards, job.nprobe,
             job.shortlist, job.shard_shortlist, job.k)
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
    timings = {"encode_s": round(encode_s, 3)}
    for key in ("coarse_s", "merge_s", "rerank_s", "normalize_s", "write_s"):
        timings[key] = round(sum(s.get(key, 0.0) for s in stats), 3)
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
                   "normalize": job.background.describe() if job.background is not None else None},
        "files": [{"file": s["file"], "sha256": s["sha256"], "rows": s["rows"], "chunk": s["chunk"],
                   "queries": s["queries"]} for s in stats],
        "chunks": [{k: v for k, v in s.items() if k not in ("file", "sha256")} for s in stats],
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
