"""``retrieval index``: gallery feature outputs -> a sharded faiss IVF-PQ index directory.

One entry point, :func:`build_index`, on an engine (:mod:`retrieval.engine`): the local engine runs
every step in this process, the Spark engine runs the per-file and per-shard steps as Spark tasks.
Both call the same task functions on the same plan, so they write the same bytes.
Each phase below is a function returning a small dataclass; :func:`build_index` runs them in order.

1. plan: the feature files of the given outputs (checked: complete, gallery, one model_version,
   dimension); parameters from N and the memory budget (:mod:`.params`);
2. scan: one task per feature file verifies its sha256, counts bad vectors and draws its part
   of the uniform training sample (:mod:`.quantizer`);
3. duplicates: ``image_id``s seen before, in (file_no, row) order (:mod:`.dedup`);
4. train on the driver -> ``trained.index`` (the empty trained index, stored once) (:mod:`.layout`);
5. shards: one task per slice of ``vectors_per_shard`` vectors adds them to a copy of the
   trained index (shipped as bytes) and writes ``shard-NNNNN.index`` (:mod:`.shard`); a rerun
   reuses finished shards; the tasks also compute their part of the quality figures;
6. quality + nprobe tuning (:mod:`.quality`); optional ``merged.index`` (``--merge-ondisk``, :mod:`.layout`);
7. the marker ``_manifest.json``, written last (:mod:`retrieval.outputs`).

``append=True`` adds new feature outputs to an existing index with its trained quantizer: new
file numbers, new shards, updated manifest.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from retrieval import faults, fsio, outputs
from retrieval.config import Config
from retrieval.engine import Engine, as_engine
from retrieval.index import dedup, layout, pdq as pdq_index, skipped_rows, takedowns
from retrieval.index.params import IndexParams, choose_params, is_fast_scan
from retrieval.index.quality import K, make_queries, metrics, pick_sources
from retrieval.index.reader import FeatureFile, FeatureInputError, list_feature_files
from retrieval.index.shard import ShardJob, ShardResult, plan_slices, shard_task
from retrieval.index.store import TRAINED, read_index_manifest
from retrieval.index.quantizer import FileScan, ScanJob, deserialize, scan_file

log = logging.getLogger(__name__)


# what the phases of a build hand on
@dataclass(frozen=True)
class _Run:
    """One build's inputs and settings, read by every phase."""
    feature_urls: list[str]
    output_url: str
    cfg: Config
    engine: Engine
    append: bool
    merge_ondisk: bool
    index_cfg: Any               # cfg["index"]
    dim: int
    seed: int
    every: float          # progress_seconds
    storage_options: dict


@dataclass(frozen=True)
class _Plan:
    old: dict | None                # the manifest of the index appended to
    old_files: list[FeatureFile]    # its feature files
    files: list[FeatureFile]        # the new feature files
    params: IndexParams
    fingerprint: str
    n_rows: int                     # rows of the new files


@dataclass(frozen=True)
class _Scan:
    job: ScanJob
    scans: list[FileScan]
    on_driver: bool                 # duplicates found from id hashes on the driver


@dataclass(frozen=True)
class _Selection:
    dups: dedup.Duplicates          # every duplicate found
    skip: dedup.Duplicates          # those left out of the index (index.duplicates=skip)
    skipped: dict                   # this build's "skipped" block
    sample: np.ndarray              # the training sample (valid, non-duplicate rows)
    sample_ids: np.ndarray


@dataclass(frozen=True)
class _Trained:
    data: bytes                     # the serialized empty trained index
    sha256: str
    train_size: int


@dataclass(frozen=True)
class _Queries:
    quality: np.ndarray
    tune: np.ndarray
    source_ids: np.ndarray          # the sample rows the queries are made from


@dataclass(frozen=True)
class _Shards:
    result: ShardResult
    stats: list[dict]               # this build's shards, by shard number
    first: int                      # this build's first shard number
    count: int
    manifest: list[dict]            # the manifest's "shards": the old index's and this build's


def _lap(timings: dict[str, float], key: str, t: float) -> float:
    now = time.monotonic()
    timings[key] = round(now - t, 3)
    return now


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# the phases of a build
def _start(feature_urls: Sequence[str] | str, output_url: str, cfg: Config, engine: Engine, append: bool,
           merge_ondisk: bool) -> _Run:
    """The settings; the output checked writable."""
    index_cfg = cfg["index"]
    storage_options = cfg["io.storage_options"]
    fsio.configure(storage_options)
    feature_urls = [feature_urls] if isinstance(feature_urls, str) else list(feature_urls)
    if not feature_urls:
        raise ValueError("index: no feature outputs given (--features)")
    fsio.ensure_writable(output_url)
    if merge_ondisk and fsio.protocol_of(output_url) not in ("file", "local"):
        raise ValueError(f"--merge-ondisk needs a local output directory (an on-disk index is served "
                         f"from a local disk), got {output_url}")
    return _Run(feature_urls=feature_urls, output_url=output_url, cfg=cfg, engine=engine, append=append,
                merge_ondisk=merge_ondisk, index_cfg=index_cfg, dim=int(cfg["model.coarse_dim"]),
                seed=int(index_cfg["seed"]),
                every=float(index_cfg["progress_seconds"]), storage_options=storage_options)


def _plan(run: _Run) -> _Plan:
    """1. the feature files (old and new) and the parameters."""
    feature_urls, output_url, cfg, dim = run.feature_urls, run.output_url, run.cfg, run.dim
    old: dict | None = None
    old_files: list[FeatureFile] = []
    if run.append:
        old = read_index_manifest(output_url)
        if int(old["dim"]) != dim:
            raise ValueError(f"{output_url}: the index holds {old['dim']}-d codes, config "
                             f"model.coarse_dim is {dim}")
        known = {(f["url"], f["sha256"]) for f in old["feature_files"]}
        files = list_feature_files(feature_urls, len(old["feature_files"]), old["model_version"])
        again = [f.url for f in files if (f.url, f.sha256) in known]
        if again:
            raise FeatureInputError(f"already in the index {output_url}: {again[0]}"
                                    + (f" and {len(again) - 1} more files" if len(again) > 1 else ""))
        old_files = [FeatureFile.from_dict({**f, "output": f.get("output", "")}) for f in old["feature_files"]]
    else:
        files = list_feature_files(feature_urls)
    n_rows = sum(f.rows for f in files)
    if not files or n_rows == 0:
        raise FeatureInputError(f"no vectors to index: the feature outputs {', '.join(feature_urls)} "
                                "hold no rows")
    if old is not None:
        params = IndexParams(**{**old["params"], "nprobe_grid": tuple(old["params"]["nprobe_grid"])})
    else:
        # faiss cannot merge fast-scan (blocked) lists on disk: an on-disk build uses 8-bit PQ codes
        params = choose_params(n_rows, dim, cfg, fast_scan=bool(cfg["index.fast_scan"]) and not run.merge_ondisk)
    settings = {k: v for k, v in cfg["index"].to_dict().items() if k not in ("mode", "threads", "progress_seconds", "fine_by_list")}
    # auto enters the fingerprint as 0, its spelling before 0.2: an interrupted older run still resumes
    settings.update({k: 0 for k in ("nlist", "nprobe") if settings[k] == "auto"})
    settings["index_key_chosen"] = params.index_key
    build_fp = _fingerprint([f.to_dict() for f in files], settings, dim, old and old.get("fingerprint"))
    if run.merge_ondisk and is_fast_scan(params.index_key):
        raise ValueError(f"--merge-ondisk needs an index with flat inverted lists; {params.index_key} is a "
                         "fast-scan index (blocked 4-bit codes, which faiss cannot merge on disk): "
                         "serve its shards with IndexShards, or build with a non-fast-scan index.index_key")
    return _Plan(old=old, old_files=old_files, files=files, params=params, fingerprint=build_fp, n_rows=n_rows)


def _scan(run: _Run, plan: _Plan) -> _Scan:
    """2. one task per new feature file: checks, bad vectors, training sample (+ id hashes)."""
    index_cfg = run.index_cfg
    on_driver = sum(f.rows for f in plan.old_files + plan.files) <= int(index_cfg["dedup_on_driver_max"])
    # an append samples the quality queries only
    want = plan.params.train_size if plan.old is None else 4 * index_cfg["quality_queries"]
    job = ScanJob(dim=run.dim, rate=min(1.0, want / plan.n_rows), seed=run.seed, batch_rows=index_cfg["batch_rows"],
                  hash_ids=on_driver, storage_options=run.storage_options)
    scans: list[FileScan] = run.engine.map(functools.partial(scan_file, job), plan.files, "index scan", run.every)
    return _Scan(job=job, scans=scans, on_driver=on_driver)


def _duplicates(run: _Run, plan: _Plan, scan: _Scan) -> dedup.Duplicates:
    old_files, files, index_cfg = plan.old_files, plan.files, run.index_cfg
    first_new, all_files = files[0].file_no, old_files + files
    if scan.on_driver:
        hashes = {s.file_no: s.id_hashes for s in scan.scans}
        if old_files:
            hashes.update(zip([f.file_no for f in old_files],
                              run.engine.map(dedup.file_hashes, old_files, "index ids", run.every)))
        dups = dedup.find_from_hashes(all_files, hashes, first_new)
    else:
        dups = dedup.find(run.engine, all_files, first_new, run.storage_options)
    if dups.count and index_cfg["duplicates"] == "error":
        ex = dups.examples[0]
        raise FeatureInputError(f"{dups.count} duplicate image_id rows (index.duplicates=error), e.g. "
                                f"{ex['image_id']!r} at (file_no, row) {ex['kept']} and {ex['duplicates']}")
    if dups.count:
        log.warning("%d duplicate image_id rows (%s)", dups.count,
                    "skipped" if index_cfg["duplicates"] == "skip" else "kept")
    return dups


def _select(run: _Run, plan: _Plan, scan: _Scan) -> _Selection:
    """3. duplicates (the new files are verified now), the bad-vector counts, the training sample."""
    dups = _duplicates(run, plan, scan)
    skip = dups if run.index_cfg["duplicates"] == "skip" else dedup.Duplicates()
    # the gallery's takedown list (retrieval remove): its ids' rows stay out of every build
    skip, removed = takedowns.apply_list(run.engine, run.output_url, plan.files, skip, run.storage_options)
    skipped = {**skipped_rows.block(plan.files, scan.scans, dups, run.index_cfg["duplicates"]), "removed": removed}
    valid = sum(s.valid for s in scan.scans) - skipped["duplicates"] - removed
    if skipped["nan_inf"] or skipped["zero"]:
        log.warning("skipping %d NaN/inf and %d all-zero coarse vectors", skipped["nan_inf"], skipped["zero"])
    if valid <= 0:
        raise FeatureInputError(f"no valid vectors to index in {', '.join(run.feature_urls)}: {plan.n_rows} rows, "
                                f"{skipped['nan_inf']} NaN/inf, {skipped['zero']} zero, {dups.count} duplicates, {removed} removed")
    sample, sample_ids = skipped_rows.sample_of(scan.scans, skip, run.dim)
    return _Selection(dups=dups, skip=skip, skipped=skipped, sample=sample, sample_ids=sample_ids)


def _trained_index(run: _Run, plan: _Plan, scan: _Scan, sel: _Selection) -> _Trained:
    """4. the trained index: trained here, or the index's own (append)."""
    output_url, index_cfg, old = run.output_url, run.index_cfg, plan.old
    if old is not None:
        data = fsio.read_bytes(fsio.join(output_url, TRAINED))
        if fsio.sha256_bytes(data) != old["trained"]["sha256"]:
            raise ValueError(f"{fsio.join(output_url, TRAINED)} does not match the sha256 in the index manifest")
        train_size = int(old["train_sample_size"])
    else:
        train_fp = _fingerprint(plan.params.to_dict(), run.seed, [f.sha256 for f in plan.files], scan.job.rate,
                                index_cfg["duplicates"])
        data, train_size = layout.train_or_reuse(output_url, plan.params, sel.sample, train_fp, index_cfg)
    return _Trained(data=data, sha256=fsio.sha256_bytes(data), train_size=train_size)


def _queries(run: _Run, sel: _Selection) -> _Queries:
    """The quality and nprobe-tuning queries: noisy copies of sample vectors."""
    index_cfg, seed = run.index_cfg, run.seed
    pos = pick_sources(len(sel.sample), max(int(index_cfg["quality_queries"]), int(index_cfg["tune_queries"])), seed)
    queries = make_queries(sel.sample[pos[:int(index_cfg["quality_queries"])]], float(index_cfg["quality_noise"]), seed)
    tune_queries = make_queries(sel.sample[pos[:int(index_cfg["tune_queries"])]], float(index_cfg["tune_noise"]), seed)
    return _Queries(quality=queries, tune=tune_queries, source_ids=sel.sample_ids[pos])


def _shards(run: _Run, plan: _Plan, sel: _Selection, trained: _Trained, queries: _Queries) -> _Shards:
    """5. one task per slice of ``vectors_per_shard`` vectors (+ their part of the quality figures)."""
    index_cfg, output_url, old, n_rows = run.index_cfg, run.output_url, plan.old, plan.n_rows
    first_shard = len(old["shards"]) if old is not None else 0
    slices = plan_slices([(f.file_no, f.url, f.rows) for f in plan.files], int(index_cfg["vectors_per_shard"]),
                         first_shard,
                         sel.skip.rows_in, _fingerprint(trained.sha256, plan.params.index_key, index_cfg["duplicates"]))
    # shard files of an earlier, different plan (e.g. an interrupted run over other inputs)
    fsio.remove_stale(output_url, "shard", ("_shards",), keep=set(range(first_shard)) | {s.shard for s in slices})
    job = ShardJob(output=output_url, trained_sha256=trained.sha256, batch_rows=int(index_cfg["batch_rows"]),
                   threads=index_cfg["threads"], queries=queries.quality, source_ids=queries.source_ids, k=K,
                   grid=plan.params.nprobe_grid, faults=faults.configured(),
                   storage_options=run.storage_options, progress_seconds=run.every, fine_by_list=index_cfg["fine_by_list"])
    trained_ref = run.engine.broadcast(trained.data)
    try:
        # local engine: one bar in vectors (the shards' own progress counts into it); Spark: tasks
        with run.engine.progress("index shards", sum(s.rows() for s in slices), "vectors", run.every):
            result: ShardResult = run.engine.map_reduce(functools.partial(shard_task, job, trained_ref), slices,
                                                        ShardResult.merge, "index shards", run.every)
    finally:
        trained_ref.destroy()
    stats = sorted(result.stats, key=lambda s: s["shard"])
    shard_counts = {k: sum(s["skipped"][k] for s in stats) for k in ("rows", "nan_inf", "zero")}
    skipped = sel.skipped
    if shard_counts != {"rows": n_rows, "nan_inf": skipped["nan_inf"], "zero": skipped["zero"]}:
        raise RuntimeError(f"shard counts {shard_counts} disagree with the scan ({n_rows} rows, {skipped}): "
                           "were feature files changed during the build?")
    keys = ("shard", "file", "sha256", "ntotal", "bytes", "segments", "fine_by_list")
    all_shards = (old["shards"] if old is not None else []) + [{k: s[k] for k in keys if k in s} for s in stats]
    return _Shards(result=result, stats=stats, first=first_shard, count=len(slices), manifest=all_shards)


def _quality(run: _Run, plan: _Plan, result: ShardResult, trained_data: bytes, queries: _Queries) -> dict:
    """6. the manifest's ``quality`` block; its ``nprobe`` is the index's default."""
    index_cfg, old, params = run.index_cfg, plan.old, plan.params
    quality = {"queries": 0}
    if result.quality is not None:
        quality = metrics(result.quality, deserialize(trained_data), queries.quality, queries.tune,
                          queries.source_ids, float(index_cfg["target_recall"]))
    # without quality queries (index.quality_queries=0): 1/64 of the cells
    tuned = quality.get("tuned_nprobe", max(1, params.nlist // 64))
    nprobe = (max(tuned, int(old["nprobe"])) if old is not None else tuned) if index_cfg["nprobe"] == "auto" \
        else int(index_cfg["nprobe"])
    at = next((r for r in quality.get("by_nprobe", []) if r["nprobe"] == nprobe), {})
    at = {k: v for k, v in at.items() if k != "nprobe"}
    if quality.get("queries"):
        log.info("quality at nprobe=%d (%d queries, exact search over all new vectors): recall@10 %.4f, "
                 "recall@100 %.4f, cell_recall@10 %.4f, source_cell_recall %.4f (tuned nprobe %d)", nprobe,
                 quality["queries"], at.get("recall@10", float("nan")), at.get("recall@100", float("nan")),
                 at.get("cell_recall@10", float("nan")), at.get("source_cell_recall", float("nan")), tuned)
    return {"nprobe": nprobe, "queries": quality.get("queries", 0), "noise": float(index_cfg["quality_noise"]),
            "tune_queries": quality.get("tune_queries", 0), "tune_noise": float(index_cfg["tune_noise"]), **at,
            "by_nprobe": quality.get("by_nprobe", []),
            "tuned_nprobe": tuned, "target_recall": float(index_cfg["target_recall"])}


def _manifest(run: _Run, plan: _Plan, sel: _Selection, trained: _Trained, shards: _Shards, quality: dict,
              merged: dict | None, timings: dict[str, float]) -> dict:
    """7. the manifest: this build's figures in ``builds``, the whole index's at the top."""
    index_cfg, old, params, files, stats = run.index_cfg, plan.old, plan.params, plan.files, shards.stats
    ntotal = sum(s["ntotal"] for s in shards.manifest)
    disk = sum(s["bytes"] for s in shards.manifest) + len(trained.data)
    total_skipped = dict(sel.skipped)
    if old is not None:  # the manifest's figures cover the whole index; each build's are in "builds"
        for key in ("nan_inf", "zero", "duplicates", "duplicates_found", "renormalised", "removed"):
            total_skipped[key] += int(old.get("skipped", {}).get(key, 0))
    this_build = {"kind": "append" if run.append else "build", "features": run.feature_urls,
                  "file_nos": [files[0].file_no, files[-1].file_no + 1],
                  "shards": [shards.first, shards.first + shards.count], "rows": plan.n_rows,
                  "added": sum(s["ntotal"] for s in stats),
                  "shards_reused": sum(1 for s in stats if s.get("reused")), "skipped": sel.skipped,
                  "quality": quality, "timings": timings, "engine": run.engine.name,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    manifest = {
        "stage": "index", "output": run.output_url, "fingerprint": plan.fingerprint,
        "index_key": params.index_key, "nlist": params.nlist, "pq_bytes": params.pq_bytes, "pq_m": params.pq_m,
        "pq_nbits": params.pq_nbits, "code_bytes": params.pq_bytes, "metric": "inner_product",
        "dim": run.dim, "fine_dim": int(run.cfg["model.fine_dim"]), "model_version": files[0].model_version,
        "nprobe": quality["nprobe"], "params": params.to_dict(),
        "feature_files": (old["feature_files"] if old is not None else []) + [f.to_dict() for f in files],
        "shards": shards.manifest, "ntotal": ntotal,
        "trained": {"file": TRAINED, "sha256": trained.sha256, "bytes": len(trained.data)},
        "train_sample_size": trained.train_size, "vectors_per_shard": int(index_cfg["vectors_per_shard"]),
        "bytes_on_disk": disk, "bytes_per_vector": round(disk / max(ntotal, 1), 2),
        "quality": quality, "skipped": total_skipped, "timings": timings,
        "builds": (old.get("builds", []) if old is not None else []) + [this_build],
        "config": run.cfg.to_dict(), "engine": run.engine.name, "created": this_build["created"],
    }
    if run.engine.session is not None:
        manifest["engine_session"] = run.engine.session
    if merged is not None:
        manifest["merged"] = merged
    takedowns.carry_into(manifest, run.output_url, old)
    return manifest


# ---------------------------------------------------------------------------------------------
@outputs.leased
def build_index(feature_urls: Sequence[str] | str, output_url: str, cfg: Config, engine: Engine | Any = None,
                append: bool = False, merge_ondisk: bool = False) -> dict:
    """Build (or, with ``append``, extend) the index at ``output_url`` from gallery feature
    outputs on ``engine`` (:func:`retrieval.engine.as_engine`); returns the manifest."""
    t0 = t = time.monotonic()
    timings: dict[str, float] = {}
    run = _start(feature_urls, output_url, cfg, as_engine(engine), append, merge_ondisk)
    outputs.claim(output_url, outputs.identity("index", cfg, run.feature_urls), cfg,
                  overwrite=run.index_cfg["mode"] == "overwrite", append=append)
    plan = _plan(run)
    if not append:
        existing = layout.existing(output_url, run.index_cfg["mode"], plan.fingerprint)
        if existing is not None:
            return existing
    log.info("index %s -> %s: %d feature files, %d rows, %s (%s), %s engine", ", ".join(run.feature_urls),
             output_url, len(plan.files), plan.n_rows, plan.params.index_key, "appending" if append else "new index",
             run.engine.name)
    scan = _scan(run, plan)
    t = _lap(timings, "scan_s", t)
    sel = _select(run, plan, scan)
    t = _lap(timings, "duplicates_s", t)
    trained = _trained_index(run, plan, scan, sel)
    t = _lap(timings, "train_s", t)
    queries = _queries(run, sel)
    shards = _shards(run, plan, sel, trained, queries)
    t = _lap(timings, "shards_s", t)
    quality = _quality(run, plan, shards.result, trained.data, queries)
    t = _lap(timings, "quality_s", t)
    pdq = pdq_index.build(run.engine, plan.old_files + plan.files, output_url, run.index_cfg["duplicates"],  # None:
                          run.storage_options, run.every, int(run.cfg["pdq.shard_rows"]))  # no PDQ hashes
    t = _lap(timings, "pdq_s", t)
    merged = None
    if merge_ondisk:  # 6. the optional merged on-disk index
        merged = layout.merge_ondisk(output_url, trained.data, [s["file"] for s in shards.manifest])
        _lap(timings, "merge_s", t)
    _lap(timings, "total_s", t0)
    manifest = {**_manifest(run, plan, sel, trained, shards, quality, merged, timings), **({"pdq": pdq} if pdq else {})}
    manifest = outputs.commit(output_url, "index", manifest)  # 7. written last
    log.info("index done: %d vectors in %d shards (%d reused), %s, nprobe %d, %.1f B/vector, %.1fs -> %s",
             manifest["ntotal"], len(shards.manifest), manifest["builds"][-1]["shards_reused"], plan.params.index_key,
             manifest["nprobe"], manifest["bytes_per_vector"], timings["total_s"], output_url)
    return manifest
