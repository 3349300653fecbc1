"""The gallery searched against itself (``retrieval duplicates``): every indexed gallery row is a query
through the search's own plan (:mod:`retrieval.search.flow`: the same coarse IVF-PQ shortlist, merge
and exact 512-d rerank, on either engine), with its score normalisation and false-match rates when
``search.normalize.background`` is set. The rows are the search's result rows (one part file per
query chunk); each image finds itself too (the caller drops those self-pairs)."""
from __future__ import annotations

import dataclasses
import logging

from retrieval.engine import Engine
from retrieval.search import calibrate
from retrieval.search import job as job_mod
from retrieval.search import normalize as normalize_mod

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GalleryRun:
    """What a self-search ran: its chunks' stats, the false-match estimate (None without a
    background), the normalisation (None: off) and the resolved parameters."""
    stats: list[dict]
    calibration: calibrate.NullTail | None
    background: normalize_mod.Background | None
    params: dict


def search_gallery(index_url: str, index_manifest: dict, rows_url: str, cfg, engine: Engine) -> GalleryRun:
    """Every row of the index's gallery feature files searched against the index; the result part
    files in ``rows_url`` (which the caller has claimed and emptied). ``cfg.search`` configures the
    search as it does ``retrieval search`` (``search.k``: neighbours per image, the image itself included)."""
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
    log.info("gallery self-search: %d images in %d chunks against %s (%d shards, nprobe %d, shortlist %d, k %d)",
             sum(rows), len(job.chunks), index_url, job.n_shards, job.nprobe, job.shortlist, job.k)
    stats = job_mod.run(job, engine, search_cfg.progress_seconds)
    params = {"shortlist": job.shortlist, "shard_shortlist": job.shard_shortlist, "k": job.k,
              "nprobe": job.nprobe, "rerank": job.rerank, "chunks": len(job.chunks),
              "normalize": background.describe() if background is not None else None}
    return GalleryRun(stats=stats, calibration=tail, background=background, params=params)
