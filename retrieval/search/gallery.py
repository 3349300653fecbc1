"""The gallery searched against itself (``retrieval duplicates``): every indexed gallery row is a query
through the search's own plan (:mod:`retrieval.search.flow`: the same coarse IVF-PQ shortlist, merge
and exact 512-d rerank, on either engine), with its score normalisation and false-match rates when
``search.normalize.background`` is set. The rows are the search's result rows (one part file per
query chunk); each image finds itself too (the caller drops those self-pairs).

With every image a query, the gallery-major rerank's block tasks would hold the pairs of all N
queries (N x S / blocks x 36 B each: ~150 GB at 1e9). So the queries run in **slices** of
consecutive chunks (:func:`plan_slices`), one search plan each, that bound a block task's pairs
(``slice_mb``); each slice reads the gallery's fine column again. The rows are the same whatever
the slicing: a query's result depends only on its own shortlist."""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from retrieval import fsio
from retrieval.engine import Engine
from retrieval.search import calibrate
from retrieval.search import job as job_mod
from retrieval.search import normalize as normalize_mod
from retrieval.search.queries import Chunk
from retrieval.search.tasks import part_name

log = logging.getLogger(__name__)

PAIR_BYTES = 36.0     # a gallery-major block task holds 16 B per routed pair and 20 B per kept pair


def slice_queries(configured: int | str, rerank: str, blocks: int, shortlist: int, slice_mb: float,
                  total: int) -> int:
    """Queries per slice: ``configured`` (a number), or for ``auto`` as many as keep a
    gallery-major block task's pairs (queries x ``shortlist`` / ``blocks`` x 36 B) within
    ``slice_mb``; chunk-major, all of them (its tasks' memory does not grow with the queries)."""
    if configured != "auto":
        return max(1, int(configured))
    if rerank != "gallery":
        return max(1, total)
    return max(1, int(slice_mb * 2**20 * max(1, blocks) // (max(1, shortlist) * PAIR_BYTES)))


def plan_slices(chunks: Sequence[Chunk], per_slice: int) -> list[list[Chunk]]:
    """Consecutive chunks in slices of at most ``per_slice`` queries (one chunk at least)."""
    out: list[list[Chunk]] = []
    held = 0
    for c in chunks:
        n = c.stop - c.start
        if not out or held + n > per_slice:
            out.append([])
            held = 0
        out[-1].append(c)
        held += n
    return out


@dataclasses.dataclass(frozen=True)
class GalleryRun:
    """What a self-search ran: its chunks' stats, the false-match estimate (None without a
    background), the normalisation (None: off) and the resolved parameters."""
    stats: list[dict]
    calibration: calibrate.NullTail | None
    background: normalize_mod.Background | None
    params: dict


def search_gallery(index_url: str, index_manifest: dict, rows_url: str, cfg, engine: Engine,
                   slice_images: int | str = "auto", slice_mb: float = 2048.0) -> GalleryRun:
    """Every row of the index's gallery feature files searched against the index; the result part
    files in ``rows_url`` (which the caller has claimed and emptied). ``cfg.search`` configures the
    search as it does ``retrieval search`` (``search.k``: neighbours per image, the image itself
    included); ``slice_images``/``slice_mb``: the slices (:func:`slice_queries`)."""
    from retrieval.index import store

    search_cfg = cfg.search
    feature_urls = list(store.feature_file_urls(index_manifest))
    background = normalize_mod.load_background(search_cfg.normalize, index_manifest, feature_urls)
    if search_cfg.verify:
        job_mod.verify_index_inputs(index_url, index_manifest, engine, cfg["io.storage_options"])
    files = index_manifest["feature_files"]
    storages = {f.get("storage", "int8") for f in files}
    if len(storages) > 1:
        raise ValueError(f"{index_url}: the gallery feature files mix storage forms {sorted(storages)}; "
                         "re-extract them with one extract.storage to search the gallery against itself")
    rows = [int(f.get("rows") or 0) for f in files]
    qman = {"storage": storages.pop() if storages else "int8"}
    job, _ = job_mod.make_job(rows_url, index_url, index_manifest, feature_urls, qman, rows, cfg, background)
    tail, why = calibrate.for_search(background, feature_urls, rows, int(search_cfg.normalize.fmr_queries),
                                     int(search_cfg.normalize.seed), job_mod.gallery_size(index_manifest))
    if background is not None and tail is None:
        log.warning("no false-match rates (fmr columns null): %s", why)
    job = dataclasses.replace(job, calibration=tail)
    n_blocks = job.scoring_blocks
    per_slice = slice_queries(slice_images, job.rerank, n_blocks, job.shortlist, slice_mb, sum(rows))
    slices = plan_slices(job.chunks, per_slice)
    log.info("gallery self-search: %d images in %d chunks, %d slices of <= %d, against %s (%d shards, nprobe %d, "
             "shortlist %d, k %d, %s-major rerank)", sum(rows), len(job.chunks), len(slices), per_slice, index_url,
             job.n_shards, job.nprobe, job.shortlist, job.k, job.rerank)
    stats = [s for i, part in enumerate(slices) for s in _run_slice(job, i, part, engine, search_cfg.progress_seconds)]
    if not slices:
        stats = job_mod.run(job, engine, search_cfg.progress_seconds)
    params = {"shortlist": job.shortlist, "shard_shortlist": job.shard_shortlist, "k": job.k,
              "nprobe": job.nprobe, "rerank": job.rerank, "chunks": len(job.chunks), "slices": len(slices),
              "slice_images": per_slice, "blocks": n_blocks, "fine_by_list": bool(job.list_blocks),
              "normalize": background.describe() if background is not None else None}
    return GalleryRun(stats=stats, calibration=tail, background=background, params=params)


def _run_slice(job, i: int, chunks: list[Chunk], engine: Engine, every: float) -> list[dict]:
    """One slice's chunks, renumbered from 0, searched into ``slice-NNNNN/`` beside the parts, then
    each part moved to its chunk's own name (the rows as one unsliced run writes them)."""
    if len(chunks) == len(job.chunks):
        return job_mod.run(job, engine, every)
    where = fsio.join(job.output, f"slice-{i:05d}")
    local = tuple(Chunk(n, c.file_no, c.start, c.stop) for n, c in enumerate(chunks))
    stats = job_mod.run(dataclasses.replace(job, chunks=local, output=where), engine, every)
    fs, _ = fsio.url_to_fs(job.output)
    for s in stats:
        no = chunks[s["chunk"]].chunk
        fs.mv(fsio.strip_protocol(fsio.join(where, s["file"])), fsio.strip_protocol(fsio.join(job.output, part_name(no))))
        s.update(chunk=no, file=part_name(no), slice=i)
    fs.rm(fsio.strip_protocol(where), recursive=True)
    log.info("gallery self-search: slice %d done (%d chunks)", i, len(chunks))
    return stats
