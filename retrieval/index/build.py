"""``retrieval build-index``: gallery feature outputs -> a sharded faiss IVF-PQ index directory.

One entry point, :func:`build_index`, and one switch between engines: ``spark=None`` runs every
step in this process, a SparkSession runs the per-file and per-shard steps as Spark tasks. Both
call the same task functions on the same plan, so they write the same bytes.

1. plan: the feature files of the given outputs (checked: complete, gallery, one model_version,
   dimension); parameters from N and the memory budget (:mod:`.params`);
2. scan: one task per feature file verifies its sha256, counts bad vectors and draws its part
   of the uniform training sample (:mod:`.train`);
3. duplicates: ``image_id``s seen before, in (file_no, row) order (:mod:`.dedup`);
4. train on the driver -> ``trained.index`` (the empty trained index, stored once);
5. shards: one task per slice of ``vectors_per_shard`` vectors adds them to a copy of the
   trained index (shipped as bytes) and writes ``shard-NNNNN.index`` (:mod:`.shard`); a rerun
   reuses finished shards; the tasks also compute their part of the quality figures;
6. quality + nprobe tuning (:mod:`.quality`); optional ``merged.index`` (``--merge-ondisk``);
7. ``manifest.json``, written last.

``append=True`` adds new feature outputs to an existing index with its trained quantizer: new
file numbers, new shards, updated manifest.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Callable, Sequence

import numpy as np

from retrieval import fsio
from retrieval.config import Config
from retrieval.index import dedup, idmap
from retrieval.index.params import IndexParams, choose_params, is_fast_scan
from retrieval.index.quality import K, make_queries, metrics, pick_sources
from retrieval.index.reader import FeatureFile, FeatureInputError, list_feature_files
from retrieval.index.shard import ShardJob, ShardResult, plan_slices, run_shard
from retrieval.index.store import MANIFEST, TRAINED, read_index_manifest
from retrieval.index.train import (FileScan, ScanJob, deserialize, scan_file, serialize, set_threads,
                                   train_index)

log = logging.getLogger(__name__)
TRAINED_MARKER = "_trained.json"
MERGED_INDEX, MERGED_DATA = "merged.index", "merged.ivfdata"


# ---------------------------------------------------------------------------------------------
# the two engines: a loop here, or Spark tasks
def _shard_task(job: ShardJob, trained: Any, spec) -> ShardResult:
    data = trained.value if hasattr(trained, "value") else trained  # a Spark broadcast, or bytes
    return run_shard(job, data, spec)


_TASK_ERROR = re.compile(r"(FeatureInputError|IndexIntegrityError): ([^\n]+)")


def _spark_action(spark, label: str, n_tasks: int, every: float, action: Callable):
    """Run a Spark action; a bad-input error raised in a task comes back as the same clear error
    (not buried in a Java stack trace)."""
    from retrieval.sparkutil import ProgressMonitor

    try:
        with ProgressMonitor(spark, label, total_tasks=n_tasks, every=every):
            return action()
    except Exception as exc:
        m = _TASK_ERROR.search(str(exc))
        if m and not isinstance(exc, FeatureInputError):
            raise FeatureInputError(m.group(2)) from None
        raise


def _map(spark, fn: Callable, items: Sequence, label: str, every: float) -> list:
    if spark is None:
        return [fn(x) for x in items]
    rdd = spark.sparkContext.parallelize(list(items), max(1, len(items))).map(fn)
    return _spark_action(spark, label, len(items), every, rdd.collect)


def _map_reduce(spark, fn: Callable, items: Sequence, merge: Callable, label: str, every: float):
    if spark is None:
        return functools.reduce(merge, (fn(x) for x in items))
    rdd = spark.sparkContext.parallelize(list(items), max(1, len(items))).map(fn)
    return _spark_action(spark, label, len(items), every, lambda: rdd.treeReduce(merge, depth=2))


# ---------------------------------------------------------------------------------------------
def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _remove(output_url: str, names: Sequence[str]) -> None:
    fs, root = fsio.url_to_fs(output_url)
    for name in names:
        p = f"{root.rstrip('/')}/{name}"
        if fs.exists(p):
            fs.rm(p, recursive=True)


def _index_files(output_url: str) -> list[str]:
    fs, root = fsio.url_to_fs(output_url)
    if not fs.exists(root):
        return []
    out = []
    for p in fs.ls(root, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(("shard-", ".tmp-")) or base in (MANIFEST, TRAINED, TRAINED_MARKER, "_shards",
                                                              MERGED_INDEX, MERGED_DATA):
            out.append(base)
    return out


def _sample_of(scans: list[FileScan], dups: dedup.Duplicates, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The training sample (valid, non-duplicate rows) and its ids, in file order."""
    vecs, ids = [], []
    for s in sorted(scans, key=lambda s: s.file_no):
        if not len(s.sample_rows):
            continue
        keep = ~np.isin(s.sample_rows, dups.skip.get(s.file_no, np.zeros(0, np.int64)))
        vecs.append(s.sample[keep])
        ids.append(idmap.encode_ids(s.file_no, s.sample_rows[keep]))
    if not vecs:
        return np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    return np.ascontiguousarray(np.concatenate(vecs)), np.concatenate(ids)


def _bad_examples(files: list[FeatureFile], scans: list[FileScan]) -> list[dict]:
    by_no = {f.file_no: f for f in files}
    out = []
    for s in scans:
        for row, reason in s.bad_rows:
            if len(out) < 20:
                out.append({"file_no": s.file_no, "file": by_no[s.file_no].url, "row": int(row),
                            "reason": reason})
    if out:
        urls = [f.url for f in sorted(files, key=lambda f: f.file_no)]
        first = min(f.file_no for f in files)
        ids = idmap.encode_ids(np.array([e["file_no"] - first for e in out]), np.array([e["row"] for e in out]))
        table = idmap.fetch_rows(urls, ids, ["image_id"])
        for e, image_id in zip(out, table.column("image_id").to_pylist()):
            e["image_id"] = image_id
    return out


def _merge_ondisk(output_url: str, trained_data: bytes, shard_files: list[str]) -> dict:
    """All shards -> one on-disk index (``merged.index`` + ``merged.ivfdata``), faiss's
    ``merge_ondisk``: inverted lists are memory-mapped, never all in RAM."""
    from faiss.contrib.ondisk import merge_ondisk

    import faiss

    if fsio.protocol_of(output_url) not in ("file", "local"):
        raise ValueError(f"--merge-ondisk needs a local output directory (an on-disk index is served "
                         f"from a local disk), got {output_url}")
    _, root = fsio.url_to_fs(output_url)
    root = root.rstrip("/")
    tmp = f"{root}/.tmp-merge"
    _remove(output_url, [".tmp-merge"])
    os.makedirs(tmp)
    trained = deserialize(trained_data)
    merge_ondisk(trained, [f"{root}/{f}" for f in shard_files], f"{tmp}/{MERGED_DATA}")
    faiss.write_index(trained, f"{tmp}/{MERGED_INDEX}")
    ntotal = int(trained.ntotal)
    del trained
    for name in (MERGED_DATA, MERGED_INDEX):  # same basenames: IO_FLAG_ONDISK_SAME_DIR finds the data
        os.replace(f"{tmp}/{name}", f"{root}/{name}")
    os.rmdir(tmp)
    return {"index": MERGED_INDEX, "ivfdata": MERGED_DATA, "ntotal": ntotal,
            "index_sha256": fsio.sha256_file(f"{root}/{MERGED_INDEX}"),
            "ivfdata_sha256": fsio.sha256_file(f"{root}/{MERGED_DATA}"),
            "bytes": os.path.getsize(f"{root}/{MERGED_INDEX}") + os.path.getsize(f"{root}/{MERGED_DATA}")}


# ---------------------------------------------------------------------------------------------
# the phases of a build
def _plan(feature_urls: list[str], output_url: str, cfg: Config, append: bool, merge_ondisk: bool = False
          ) -> tuple[dict | None, list[FeatureFile], list[FeatureFile], IndexParams, str]:
    """``(old manifest or None, old files, new files, params, build fingerprint)``."""
    dim = int(cfg["model.coarse_dim"])
    old: dict | None = None
    old_files: list[FeatureFile] = []
    if append:
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
        params = choose_params(n_rows, dim, cfg, fast_scan=bool(cfg["index.fast_scan"]) and not merge_ondisk)
    settings = {k: v for k, v in cfg["index"].to_dict().items() if k not in ("mode", "threads", "progress_seconds")}
    settings["index_key_chosen"] = params.index_key
    build_fp = _fingerprint([f.to_dict() for f in files], settings, dim, old and old.get("fingerprint"))
    return old, old_files, files, params, build_fp


def _existing(output_url: str, mode: str, build_fp: str) -> dict | None:
    """A complete index already at ``output_url``: returned when it is this very build, removed with
    ``mode=overwrite``, refused otherwise."""
    if not fsio.exists(fsio.join(output_url, MANIFEST)):
        return None
    existing = read_index_manifest(output_url)
    if mode == "overwrite":
        log.info("index.mode=overwrite: removing the index at %s", output_url)
        _remove(output_url, [MANIFEST])
        _remove(output_url, _index_files(output_url))
        return None
    if existing.get("fingerprint") == build_fp:
        log.info("%s is already complete for these inputs and settings: nothing to do", output_url)
        return existing
    raise FileExistsError(f"{output_url} already holds a complete index built from other inputs or settings; "
                          "add to it with --append, or rebuild with --set index.mode=overwrite")


def _duplicates(spark, scans: list[FileScan], old_files: list[FeatureFile], files: list[FeatureFile],
                on_driver: bool, ic, storage_options: dict, every: float) -> dedup.Duplicates:
    first_new, all_files = files[0].file_no, old_files + files
    if on_driver:
        hashes = {s.file_no: s.id_hashes for s in scans}
        if old_files:
            hashes.update(zip([f.file_no for f in old_files],
                              _map(spark, dedup.file_hashes, old_files, "index ids", every)))
        dups = dedup.find_from_hashes(all_files, hashes, first_new)
    elif spark is not None:
        dups = dedup.find_spark(spark, all_files, first_new, storage_options)
    else:
        dups = dedup.find_local(all_files, first_new)
    if dups.count and ic["duplicates"] == "error":
        ex = dups.examples[0]
        raise FeatureInputError(f"{dups.count} duplicate image_id rows (index.duplicates=error), e.g. "
                                f"{ex['image_id']!r} at (file_no, row) {ex['kept']} and {ex['duplicates']}")
    if dups.count:
        log.warning("%d duplicate image_id rows (%s)", dups.count,
                    "skipped" if ic["duplicates"] == "skip" else "kept")
    return dups


def _trained(output_url: str, params: IndexParams, sample: np.ndarray, fingerprint: str, ic) -> tuple[bytes, int]:
    """``(trained index bytes, training sample size)``: reused from an interrupted run with the
    same fingerprint (training is not bit-reproducible across thread counts), else trained now."""
    trained_url, marker_url = fsio.join(output_url, TRAINED), fsio.join(output_url, TRAINED_MARKER)
    if ic["mode"] == "incremental" and fsio.exists(marker_url) and fsio.exists(trained_url):
        marker = fsio.read_json(marker_url)
        data = fsio.read_bytes(trained_url)
        if marker.get("fingerprint") == fingerprint and marker.get("sha256") == fsio.sha256_bytes(data):
            log.info("reusing %s from an earlier run", trained_url)
            return data, int(marker.get("train_size", len(sample)))
    if len(sample) < params.nlist:
        raise FeatureInputError(f"{len(sample)} valid training vectors for {params.nlist} cells")
    set_threads(int(ic["threads"]))
    data = serialize(train_index(params, sample, int(ic["seed"])))
    fsio.remove_stale(output_url, "shard", ("_shards",), keep=set())  # shards of another quantizer are useless
    fsio.write_bytes(trained_url, data)
    fsio.write_json(marker_url, {"fingerprint": fingerprint, "sha256": fsio.sha256_bytes(data),
                                 "train_size": len(sample), "index_key": params.index_key})
    return data, len(sample)


def _quality(result: ShardResult, trained_data: bytes, queries: np.ndarray, tune_queries: np.ndarray,
             source_ids: np.ndarray, params: IndexParams, ic, old: dict | None) -> dict:
    """The manifest's ``quality`` block; its ``nprobe`` is the index's default."""
    quality = {"queries": 0}
    if result.quality is not None:
        quality = metrics(result.quality, deserialize(trained_data), queries, tune_queries, source_ids,
                          float(ic["target_recall"]))
    # without quality queries (index.quality_queries=0): 1/64 of the cells
    tuned = quality.get("tuned_nprobe", max(1, params.nlist // 64))
    nprobe = int(ic["nprobe"]) or (max(tuned, int(old["nprobe"])) if old is not None else tuned)
    at = next((r for r in quality.get("by_nprobe", []) if r["nprobe"] == nprobe), {})
    at = {k: v for k, v in at.items() if k != "nprobe"}
    if quality.get("queries"):
        log.info("quality at nprobe=%d (%d queries, exact search over all new vectors): recall@10 %.4f, "
                 "recall@100 %.4f, cell_recall@10 %.4f, source_cell_recall %.4f (tuned nprobe %d)", nprobe,
                 quality["queries"], at.get("recall@10", float("nan")), at.get("recall@100", float("nan")),
                 at.get("cell_recall@10", float("nan")), at.get("source_cell_recall", float("nan")), tuned)
    return {"nprobe": nprobe, "queries": quality.get("queries", 0), "noise": float(ic["quality_noise"]),
            "tune_queries": quality.get("tune_queries", 0), "tune_noise": float(ic["tune_noise"]), **at,
            "by_nprobe": quality.get("by_nprobe", []),
            "tuned_nprobe": tuned, "target_recall": float(ic["target_recall"])}


def _skipped(files: list[FeatureFile], scans: list[FileScan], dups: dedup.Duplicates, rule: str) -> dict:
    counts = {k: sum(getattr(s, k) for s in scans) for k in ("nan_inf", "zero", "renormalised")}
    return {**counts, "duplicates": dups.count if rule == "skip" else 0, "duplicates_found": dups.count,
            "duplicate_rule": rule,
            "examples": _bad_examples(files, scans) + [{"reason": "duplicate", **e} for e in dups.examples]}


# ---------------------------------------------------------------------------------------------
def build_index(feature_urls: Sequence[str] | str, output_url: str, cfg: Config, spark=None,
                append: bool = False, merge_ondisk: bool = False) -> dict:
    """Build (or, with ``append``, extend) the index at ``output_url`` from gallery feature
    outputs; returns the manifest. ``spark=None`` runs locally (no JVM)."""
    t0 = t = time.monotonic()
    timings: dict[str, float] = {}
    ic = cfg["index"]
    dim, seed, every = int(cfg["model.coarse_dim"]), int(ic["seed"]), float(ic["progress_seconds"])
    storage_options = cfg["io.storage_options"]
    fsio.configure(storage_options)
    feature_urls = [feature_urls] if isinstance(feature_urls, str) else list(feature_urls)
    if not feature_urls:
        raise ValueError("build-index: no feature outputs given (--features)")
    fsio.ensure_writable(output_url)
    if merge_ondisk and fsio.protocol_of(output_url) not in ("file", "local"):
        raise ValueError(f"--merge-ondisk needs a local output directory (an on-disk index is served "
                         f"from a local disk), got {output_url}")

    # 1. plan
    old, old_files, files, params, build_fp = _plan(feature_urls, output_url, cfg, append, merge_ondisk)
    if merge_ondisk and is_fast_scan(params.index_key):
        raise ValueError(f"--merge-ondisk needs an index with flat inverted lists; {params.index_key} is a "
                         "fast-scan index (blocked 4-bit codes, which faiss cannot merge on disk): "
                         "serve its shards with IndexShards, or build with a non-fast-scan index.index_key")
    if not append:
        existing = _existing(output_url, ic["mode"], build_fp)
        if existing is not None:
            return existing
    n_rows = sum(f.rows for f in files)
    log.info("build-index %s -> %s: %d feature files, %d rows, %s (%s), %s engine", ", ".join(feature_urls),
             output_url, len(files), n_rows, params.index_key, "appending" if append else "new index",
             "spark" if spark is not None else "local")

    # 2. scan: checks, bad vectors, training sample (+ id hashes)
    on_driver = sum(f.rows for f in old_files + files) <= int(ic["dedup_on_driver_max"])
    want = params.train_size if old is None else 4 * ic["quality_queries"]  # append: quality queries only
    scan_job = ScanJob(dim=dim, rate=min(1.0, want / n_rows), seed=seed, batch_rows=ic["batch_rows"],
                       hash_ids=on_driver, storage_options=storage_options)
    scans: list[FileScan] = _map(spark, functools.partial(scan_file, scan_job), files, "index scan", every)
    timings["scan_s"] = round(time.monotonic() - t, 3)

    # 3. duplicates (the new files are verified now)
    t = time.monotonic()
    dups = _duplicates(spark, scans, old_files, files, on_driver, ic, storage_options, every)
    skip = dups if ic["duplicates"] == "skip" else dedup.Duplicates()
    skipped = _skipped(files, scans, dups, ic["duplicates"])
    valid = sum(s.valid for s in scans) - skipped["duplicates"]
    if skipped["nan_inf"] or skipped["zero"]:
        log.warning("skipping %d NaN/inf and %d all-zero coarse vectors", skipped["nan_inf"], skipped["zero"])
    if valid <= 0:
        raise FeatureInputError(f"no valid vectors to index in {', '.join(feature_urls)}: {n_rows} rows, "
                                f"{skipped['nan_inf']} NaN/inf, {skipped['zero']} zero, {dups.count} duplicates")
    sample, sample_ids = _sample_of(scans, skip, dim)
    timings["duplicates_s"] = round(time.monotonic() - t, 3)

    # 4. the trained index: trained here, or the index's own (append)
    t = time.monotonic()
    if old is not None:
        trained_data = fsio.read_bytes(fsio.join(output_url, TRAINED))
        if fsio.sha256_bytes(trained_data) != old["trained"]["sha256"]:
            raise ValueError(f"{fsio.join(output_url, TRAINED)} does not match the sha256 in the index manifest")
        train_size = int(old["train_sample_size"])
    else:
        train_fp = _fingerprint(params.to_dict(), seed, [f.sha256 for f in files], scan_job.rate, ic["duplicates"])
        trained_data, train_size = _trained(output_url, params, sample, train_fp, ic)
    trained_sha = fsio.sha256_bytes(trained_data)
    timings["train_s"] = round(time.monotonic() - t, 3)

    # 5. shards (+ their part of the quality figures)
    t = time.monotonic()
    pos = pick_sources(len(sample), max(int(ic["quality_queries"]), int(ic["tune_queries"])), seed)
    queries = make_queries(sample[pos[:int(ic["quality_queries"])]], float(ic["quality_noise"]), seed)
    tune_queries = make_queries(sample[pos[:int(ic["tune_queries"])]], float(ic["tune_noise"]), seed)
    first_shard = len(old["shards"]) if old is not None else 0
    slices = plan_slices([(f.file_no, f.url, f.rows) for f in files], int(ic["vectors_per_shard"]), first_shard,
                         skip.rows_in, _fingerprint(trained_sha, params.index_key, ic["duplicates"]))
    # shard files of an earlier, different plan (e.g. an interrupted run over other inputs)
    fsio.remove_stale(output_url, "shard", ("_shards",), keep=set(range(first_shard)) | {s.shard for s in slices})
    job = ShardJob(output=output_url, trained_sha256=trained_sha, batch_rows=int(ic["batch_rows"]),
                   threads=int(ic["threads"]), queries=queries, source_ids=sample_ids[pos], k=K,
                   grid=params.nprobe_grid, faults=cfg["faults"].to_dict(), storage_options=storage_options,
                   progress_seconds=every)
    trained_ref = spark.sparkContext.broadcast(trained_data) if spark is not None else trained_data
    try:
        result: ShardResult = _map_reduce(spark, functools.partial(_shard_task, job, trained_ref), slices,
                                          ShardResult.merge, "index shards", every)
    finally:
        if spark is not None:
            trained_ref.destroy()
    stats = sorted(result.stats, key=lambda s: s["shard"])
    shard_counts = {k: sum(s["skipped"][k] for s in stats) for k in ("rows", "nan_inf", "zero")}
    if shard_counts != {"rows": n_rows, "nan_inf": skipped["nan_inf"], "zero": skipped["zero"]}:
        raise RuntimeError(f"shard counts {shard_counts} disagree with the scan ({n_rows} rows, {skipped}): "
                           "were feature files changed during the build?")
    timings["shards_s"] = round(time.monotonic() - t, 3)

    # 6. quality + nprobe, merged on-disk index
    t = time.monotonic()
    quality = _quality(result, trained_data, queries, tune_queries, sample_ids[pos], params, ic, old)
    timings["quality_s"] = round(time.monotonic() - t, 3)
    all_shards = (old["shards"] if old is not None else []) + [
        {k: s[k] for k in ("shard", "file", "sha256", "ntotal", "bytes", "segments")} for s in stats]
    merged = None
    if merge_ondisk:
        t = time.monotonic()
        merged = _merge_ondisk(output_url, trained_data, [s["file"] for s in all_shards])
        timings["merge_s"] = round(time.monotonic() - t, 3)

    # 7. manifest, written last
    timings["total_s"] = round(time.monotonic() - t0, 3)
    ntotal = sum(s["ntotal"] for s in all_shards)
    disk = sum(s["bytes"] for s in all_shards) + len(trained_data)
    total_skipped = dict(skipped)
    if old is not None:  # the manifest's figures cover the whole index; each build's are in "builds"
        for key in ("nan_inf", "zero", "duplicates", "duplicates_found", "renormalised"):
            total_skipped[key] += int(old.get("skipped", {}).get(key, 0))
    engine = "spark" if spark is not None else "local"
    this_build = {"kind": "append" if append else "build", "features": feature_urls,
                  "file_nos": [files[0].file_no, files[-1].file_no + 1],
                  "shards": [first_shard, first_shard + len(slices)], "rows": n_rows,
                  "added": sum(s["ntotal"] for s in stats),
                  "shards_reused": sum(1 for s in stats if s.get("reused")), "skipped": skipped,
                  "quality": quality, "timings": timings, "engine": engine,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    manifest = {
        "stage": "index", "output": output_url, "fingerprint": build_fp,
        "index_key": params.index_key, "nlist": params.nlist, "pq_bytes": params.pq_bytes, "pq_m": params.pq_m,
        "pq_nbits": params.pq_nbits, "code_bytes": params.pq_bytes, "metric": "inner_product",
        "dim": dim, "fine_dim": int(cfg["model.fine_dim"]), "model_version": files[0].model_version,
        "nprobe": quality["nprobe"], "params": params.to_dict(),
        "feature_files": (old["feature_files"] if old is not None else []) + [f.to_dict() for f in files],
        "shards": all_shards, "ntotal": ntotal,
        "trained": {"file": TRAINED, "sha256": trained_sha, "bytes": len(trained_data)},
        "train_sample_size": train_size, "vectors_per_shard": int(ic["vectors_per_shard"]),
        "bytes_on_disk": disk, "bytes_per_vector": round(disk / max(ntotal, 1), 2),
        "quality": quality, "skipped": total_skipped, "timings": timings,
        "builds": (old.get("builds", []) if old is not None else []) + [this_build],
        "config": cfg.to_dict(), "engine": engine, "created": this_build["created"],
    }
    if merged is not None:
        manifest["merged"] = merged
    fsio.write_json(fsio.join(output_url, MANIFEST), manifest)
    log.info("build-index done: %d vectors in %d shards (%d reused), %s, nprobe %d, %.1f B/vector, %.1fs -> %s",
             ntotal, len(all_shards), this_build["shards_reused"], params.index_key, manifest["nprobe"],
             manifest["bytes_per_vector"], timings["total_s"], output_url)
    return manifest
