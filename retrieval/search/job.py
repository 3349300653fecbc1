"""The bulk two-stage search job (``retrieval search``): plan, run locally or on Spark, commit.

The plan (:func:`search`): the index manifest and its files checked, the queries resolved (query
features, or images encoded here) and cut into chunks, the shortlist and K' resolved, the rerank's
mode and gallery blocks chosen (:func:`plan_rerank`); then an engine runs the task bodies
(:mod:`retrieval.search.flow`, :mod:`retrieval.search.tasks`) and the manifest is committed:
``_manifest.json`` is removed when a run starts and written when it ends, so its presence means
the output is complete.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import pyarrow.parquet as pq

from retrieval import faults, fsio, integrity, outputs
from retrieval.engine import Engine, as_engine
from retrieval.schema import RESULT_SCHEMA, RESULT_SCHEMA_VERSION, conform_results
from retrieval.search import blocks as blocks_mod
from retrieval.search import calibrate
from retrieval.search import collapse as collapse_mod
from retrieval.search import coarse as coarse_mod
from retrieval.search import geometric as geometric_mod
from retrieval.search import normalize as normalize_mod
from retrieval.search import queries as q_mod
from retrieval.search import regions as regions_mod
from retrieval.search import vectors
from retrieval.search import flow
from retrieval.search.results import read_results  # noqa: F401 (its old home)
from retrieval.search.tasks import SearchJob, part_name

log = logging.getLogger(__name__)


def _clean_output(output_url: str) -> None:
    """Remove the manifest first (the output is incomplete from now on), then old result parts."""
    outputs.begin(output_url)
    fs, root = fsio.url_to_fs(output_url)
    root = root.rstrip("/")
    for p in fs.glob(f"{root}/part-*.parquet") + fs.glob(f"{root}/.tmp-*"):
        fs.rm(p)
    old = fsio.join(output_url, "query_features")   # where 0.2 encoded query images: every Parquet
    if outputs.find(old, "extract") is not None:       # reader that recurses took them for result rows
        log.info("removing %s: query features now go beside the results (%s)", old,
                 q_mod.query_features_url(output_url))
        fs.rm(f"{root}/query_features", recursive=True)


def verify_index_inputs(index_url: str, index_manifest: dict, engine=None, storage_options=None,
                        record: str | None = None) -> int:
    """Every file the index manifest lists (trained part, shards, gallery feature files) against its
    sha256, hashed in parallel before anything is written: a clear error naming the file on both
    engines (tasks verify the shards they load again, as they read them anyway). ``record``: the
    verified-once record (:func:`retrieval.integrity.record_path`): files unchanged since they
    matched are not hashed again. Returns the number of files hashed."""
    from retrieval.index import store

    where = store.manifest_url(index_url)
    index_files = [(fsio.join(index_url, fsio.safe_relpath(e["file"])), e.get("sha256"))
                   for e in [index_manifest["trained"], *index_manifest["shards"],
                             *[s["fine_by_list"] for s in index_manifest["shards"] if s.get("fine_by_list")]]]
    return (integrity.verify_files(index_files, "index file", where, engine, storage_options, record=record)
            + integrity.verify_files([(f["url"], f.get("sha256")) for f in index_manifest["feature_files"]],
                                     "gallery feature file", where, engine, storage_options, record=record))


def plan_rerank(job: SearchJob, configured: str, layout: str = "auto") -> tuple[SearchJob, dict]:
    """The rerank's plan: ``chunk``-major, or ``gallery``-major over blocks of at most
    ``vector_cache_mb`` of decoded fine vectors (one row group at least); ``auto`` picks gallery-major when
    there are several chunks and the gallery's fine column does not fit the vector cache (each
    chunk would read it again). Also the column's size (stored and decoded bytes), from the
    feature files' footers: read once, in parallel (a billion images are thousands of files on
    object storage), into this process's cache, which the local engine's tasks then reuse."""
    from concurrent.futures import ThreadPoolExecutor

    footers = vectors.process_cache(job.vector_cache_mb)
    versions = job.feature_versions or (None,) * len(job.feature_files)
    with ThreadPoolExecutor(min(16, max(1, len(job.feature_files)))) as pool:
        list(pool.map(footers.footer, job.feature_files, versions))
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
    job = dataclasses.replace(job, rerank=mode, blocks=tuple(blocks) if mode == "gallery" else ())
    column["layout"] = "files"
    return (_list_layout(job, column, layout) if mode == "gallery" else job), column


def _list_layout(job: SearchJob, column: dict, layout: str) -> SearchJob:
    """Gallery-major: the scoring blocks as ranges of IVF lists of the index's list-ordered fine copy
    (:mod:`retrieval.search.listblocks`), when it has one and ``search.fine_layout`` allows (``auto``:
    only with more feature-file blocks than ``nprobe``, the most blocks a query row's vector goes to);
    the feature-file blocks (each reads every chunk's query vectors) otherwise, said in the log."""
    from retrieval.index import finecopy
    from retrieval.search import listblocks

    copies = finecopy.all_copies(job.index_manifest)
    if copies is None and layout == "lists":
        raise ValueError(f"{job.index_url}: search.fine_layout is lists but the index has no list-ordered fine copy "
                         "(built before it, or with index.fine_by_list: false): rebuild it, or set auto")
    if layout == "auto" and copies is not None and len(job.blocks) <= job.nprobe:
        log.info("gallery-major rerank over %d feature-file blocks: no more than nprobe (%d), so routing query "
                 "vectors by IVF list would save little (search.fine_layout: lists forces the copy)",
                 len(job.blocks), job.nprobe)
        return job
    if layout == "files" or copies is None:
        log.info("gallery-major rerank over feature-file blocks: %s; each block reads the query vectors of "
                 "every chunk that has pairs in it", "search.fine_layout is files" if layout == "files" else
                 "the index has no list-ordered fine copy (built before it, or with index.fine_by_list: false; "
                 "rebuild the index to write it)")
        return job
    urls = tuple(fsio.join(job.index_url, fsio.safe_relpath(c["file"])) for c in copies)
    nlist = int(job.index_manifest["params"]["nlist"])
    blocks, size = listblocks.plan(urls, nlist, job.vector_cache_mb << 20)
    column.update(layout="lists", stored=size["stored"], decoded=size["decoded"])
    log.info("gallery-major rerank over %d blocks of IVF lists of the list-ordered fine copy (%d lists): each "
             "query vector goes only to the blocks its shortlist touches", len(blocks), nlist)
    return dataclasses.replace(job, list_blocks=tuple(blocks), fine_copies=urls)


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
        "query_fine_bytes_shuffled": total("query_shuffle_bytes", stats),
        "gallery_fine_layout": column.get("layout", "files"),
        "shuffle_bytes": total("shuffle_bytes", stats) + total("shuffle_bytes", block_stats),
        "pairs_scored": total("pairs", block_stats) or None,
        "pairs_shuffled_back": total("pairs_kept", block_stats) or None,
    }


def gallery_size(index_manifest: dict) -> int:
    """The index's vector count."""
    return int(index_manifest.get("ntotal") or sum(int(s.get("ntotal", 0)) for s in index_manifest["shards"]))


def resolve_shortlist(configured: int | str, index_manifest: dict) -> int:
    """``search.shortlist``, or for ``auto`` the size-dependent default of
    :func:`~retrieval.search.coarse.auto_shortlist` from the index's vector count."""
    if configured != "auto" and configured > 0:
        return int(configured)
    return coarse_mod.auto_shortlist(gallery_size(index_manifest))


def make_job(output_url: str, index_url: str, index_manifest: dict, qfiles: list[str], qman: dict,
             qrows: list[int], cfg, background, starts: list | None = None) -> tuple[SearchJob, dict]:
    """The job's plain values (chunks, shortlist and K', nprobe, rerank mode and blocks) and the
    gallery fine column's size."""
    from retrieval.index import store, takedowns

    search_cfg = cfg.search
    ffiles = index_manifest["feature_files"]
    shortlist, n_shards = resolve_shortlist(search_cfg.shortlist, index_manifest), len(index_manifest["shards"])
    job = SearchJob(
        output=output_url, index_url=index_url, index_manifest=index_manifest,
        query_files=tuple(qfiles), query_int8=qman.get("storage") == "int8",
        feature_files=tuple(store.feature_file_urls(index_manifest)),
        feature_rows=tuple(f.get("rows") for f in ffiles),
        feature_versions=tuple(f.get("sha256") for f in ffiles), n_shards=n_shards,
        nprobe=int(index_manifest.get("nprobe", 1) if search_cfg.nprobe == "auto" else search_cfg.nprobe),
        shortlist=shortlist,
        shard_shortlist=coarse_mod.shard_shortlist(shortlist, n_shards, search_cfg.shard_shortlist),
        k=search_cfg.k, coarse_threshold=search_cfg.coarse_threshold, match_threshold=search_cfg.match_threshold,
        vector_cache_mb=search_cfg.vector_cache_mb, shard_cache=search_cfg.shard_cache,
        threads=search_cfg.threads, verify=search_cfg.verify,
        chunks=tuple(q_mod.plan_chunks(qrows, search_cfg.query_chunk, starts)), query_regions=starts is not None,
        region_margin=float(search_cfg.region_margin), faults=faults.configured(), storage_options=cfg["io.storage_options"], background=background,
        removed=takedowns.removed(index_url, index_manifest, search_cfg.verify),
        geometric=geometric_mod.Geometric.from_config(search_cfg.geometric))
    return plan_rerank(job, search_cfg.rerank, search_cfg.fine_layout)


def run(job: SearchJob, engine: Engine, progress_seconds: float = 10.0) -> list[dict]:
    """Every chunk's part file written by the engine (an empty part for no queries): their stats
    in chunk order."""
    if not job.chunks:
        url = fsio.join(job.output, part_name(0))
        with fsio.atomic_open(url, "wb") as fh:
            pq.write_table(RESULT_SCHEMA.empty_table(), fh)
        return [{"chunk": 0, "file": part_name(0), "rows": 0, "sha256": fsio.sha256_file(url),
                 "queries": 0, "queries_with_results": 0, "queries_with_shortlist": 0}]
    stats = flow.run(engine, job, progress_seconds)
    return sorted(stats, key=lambda s: s["chunk"])


@outputs.leased
def search(queries_url: str, index_url: str, output_url: str, cfg, engine: Engine | Any = None,
           overwrite: bool = False) -> dict:
    """Run the two-stage search on ``engine`` (:func:`retrieval.engine.as_engine`: an engine, a
    Spark session, or None for this process); returns the manifest. ``overwrite``: replace whatever
    ``output_url`` holds (:func:`retrieval.outputs.check`)."""
    from retrieval.index import store

    t0 = time.monotonic()
    engine = as_engine(engine)
    search_cfg = cfg.search
    outputs.configure_and_check_writable(output_url, cfg["io.storage_options"])
    ident = outputs.identity("search", cfg, [queries_url, index_url])
    outputs.check(output_url, ident, overwrite)        # read only: before the checks below
    index_manifest = store.read_index_manifest(index_url)
    # before anything is written: a background of another model is an error, not an empty output
    background = normalize_mod.load_background(search_cfg.normalize, index_manifest,
                                               list(store.feature_file_urls(index_manifest)))
    geometric_mod.Geometric.from_config(search_cfg.geometric)      # OpenCV there when it is on
    if search_cfg.verify:
        verify_index_inputs(index_url, index_manifest, engine, cfg["io.storage_options"],
                            integrity.record_path(cfg["io.verified_record"]))
    outputs.claim(output_url, ident, cfg, overwrite)
    _clean_output(output_url)
    qf_url, qman, encode_s = q_mod.resolve_queries(queries_url, output_url, index_url, index_manifest,
                                                   cfg, engine, overwrite)
    qfiles, qrows = q_mod.query_files(qf_url, qman, search_cfg.verify)
    # query regions: the rows that start an image, per file (chunks are cut there, rows merged per image)
    starts = [regions_mod.file_starts(u) for u in qfiles] if qman.get("query_regions") else None
    images = sum(map(len, starts)) if starts is not None else sum(qrows)
    job, column = make_job(output_url, index_url, index_manifest, qfiles, qman, qrows, cfg, background, starts)
    tail, why = calibrate.for_search(background, qfiles, qrows, int(search_cfg.normalize.fmr_queries),
                                     int(search_cfg.normalize.seed), gallery_size(index_manifest),
                                     regions=-(-sum(qrows) // images) if images else 1)
    if background is not None and tail is None:
        log.warning("no false-match rates (fmr columns null): %s", why)
    if search_cfg.collapse_groups:     # before anything is searched: a duplicates output of another model
        collapse_mod.check_groups(search_cfg.collapse_groups, index_url, index_manifest)
    job = dataclasses.replace(job, calibration=tail)
    log.info("search %s (%d queries in %d chunks) against %s (%d shards, nprobe %d, shortlist %d, "
             "%d per shard, k %d; %s-major rerank%s)", qf_url, images, len(job.chunks), index_url,
             job.n_shards, job.nprobe, job.shortlist, job.shard_shortlist, job.k, job.rerank,
             f" over {job.scoring_blocks} gallery blocks"
             f"{' of IVF lists' if job.list_blocks else ''}" if job.blocks else "")
    t1 = time.monotonic()
    stats = run(job, engine, search_cfg.progress_seconds)
    if search_cfg.collapse_groups:
        stats = collapse_mod.collapse_parts(engine, output_url, stats, search_cfg.collapse_groups,
                                            cfg["io.storage_options"], search_cfg.progress_seconds)
    manifest = outputs.commit(output_url, "search", {
        "model_version": index_manifest.get("model_version"),
        "index": index_url, "queries": queries_url, "query_features": qf_url, "output": output_url,
        "index_takedown_batches": len((index_manifest.get("takedowns") or {}).get("batches", [])),
        "schema": RESULT_SCHEMA.to_string(), "schema_version": RESULT_SCHEMA_VERSION,
        "calibration": tail.describe() if tail is not None else None,
        **summarize(job, cfg, stats, qrows, qman, column, {"encode_s": encode_s, "search_s": time.monotonic() - t1,
                                                            "total_s": time.monotonic() - t0}),
    }, engine=engine, cfg=cfg)
    log.info("search done: %d queries, %d with results, %d rows in %.1fs -> %s", manifest["counts"]["queries"],
             manifest["counts"]["queries_with_results"], manifest["counts"]["rows"],
             manifest["timings"]["total_s"], output_url)
    return manifest


def summarize(job: SearchJob, cfg, stats: list[dict], qrows: list[int], qman: dict, column: dict,
              walls: dict) -> dict:
    """The manifest's counts, params, io, files, chunks, blocks and timings from the tasks' stats."""
    search_cfg = cfg.search
    counts = {"queries": sum(s["queries"] for s in stats) if job.query_regions else sum(qrows),
              "query_rows": sum(qrows), "query_errors": int(qman.get("counts", {}).get("errors", 0)),
              "queries_with_results": sum(s["queries_with_results"] for s in stats),
              "queries_with_shortlist": sum(s["queries_with_shortlist"] for s in stats),
              "rows": sum(s["rows"] for s in stats), "chunks": len(job.chunks), "shards": job.n_shards,
              "rows_collapsed": sum(s.get("rows_collapsed", 0) for s in stats)}
    if job.geometric is not None:
        counts.update({k: sum(s.get(k, 0) for s in stats) for k in ("geometric_rows", "geometric_errors",
                                                                     "geometric_images")})
    if sum(s.get("query_rows", s["queries"]) for s in stats) != counts["query_rows"]:
        raise AssertionError(f"chunks cover {sum(s.get('query_rows', s['queries']) for s in stats)} query rows, "
                             f"expected {counts['query_rows']}")
    by_block: dict[int, dict] = {}          # a block's scoring and label-lookup figures, one entry
    for b in (b for s in stats for b in s.pop("blocks", [])):
        by_block.setdefault(b["block"], {}).update(b)
    block_stats = [by_block[b] for b in sorted(by_block)]
    timings = {"encode_s": round(walls["encode_s"], 3)}
    for key in ("coarse_s", "merge_s", "rerank_s", "normalize_s", "write_s", "geometric_s"):
        timings[key] = round(sum(s.get(key, 0.0) for s in stats), 3)
    timings["rerank_s"] = round(timings["rerank_s"] + sum(b.get("read_s", 0) + b.get("score_s", 0)
                                                          for b in block_stats), 3)
    if block_stats:
        timings["labels_s"] = round(sum(b.get("label_s", 0) for b in block_stats), 3)
    t_search = walls["search_s"]
    timings["search_s"] = round(t_search, 3)
    timings["total_s"] = round(walls["total_s"], 3)
    timings["queries_per_s"] = round(counts["queries"] / t_search, 1) if t_search > 0 and counts["queries"] else None
    return {
        "counts": counts,
        "params": {"shortlist": job.shortlist, "shard_shortlist": job.shard_shortlist, "k": job.k,
                   "nprobe": job.nprobe, "shard_shortlist_configured": search_cfg.shard_shortlist,
                   "coarse_threshold": job.coarse_threshold, "match_threshold": job.match_threshold,
                   "query_chunk": search_cfg.query_chunk, "shortlist_configured": search_cfg.shortlist,
                   "normalize": job.background.describe() if job.background is not None else None,
                   "rerank": job.rerank, "rerank_configured": search_cfg.rerank,
                   "blocks": job.scoring_blocks, "fine_by_list": bool(job.list_blocks),
                   "vector_cache_mb": job.vector_cache_mb, "collapse_groups": search_cfg.collapse_groups,
                   "query_regions": qman.get("query_regions") or [],
                   "region_margin": job.region_margin,
                   "geometric": dataclasses.asdict(job.geometric) if job.geometric is not None else None},
        "io": io_counts(stats, block_stats, column),
        "files": [{"file": s["file"], "sha256": s["sha256"], "rows": s["rows"], "chunk": s["chunk"],
                   "queries": s["queries"]} for s in stats],
        "chunks": [{k: v for k, v in s.items() if k not in ("file", "sha256")} for s in stats],
        "blocks": block_stats, "timings": timings,
    }
