"""Feature extraction: images -> Parquet feature shards (``retrieval extract``).

One function, :func:`extract_shard`, encodes one shard; the local path calls it shard after shard,
the Spark path calls it in a task that holds exactly one shard's listing rows. So both paths give
the same bytes. Per shard, in this order, each file written atomically (temp + rename):
``errors/part-NNNNN.parquet``, ``part-NNNNN.parquet``, then ``_shards/part-NNNNN.json`` - the
marker that says the shard is complete, with a fingerprint of the job and of the shard's inputs.
A rerun (mode ``incremental``) skips shards whose marker fingerprint matches; ``overwrite`` redoes
all. ``_manifest.json`` is deleted when a run starts and written when it ends: its presence means
the whole output is complete.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import faults, fsio, hashing, outputs
from retrieval.config import Config
from retrieval.engine import Engine, as_engine, task_attempt, task_threads
from retrieval.extract import inputs as inputs_mod
from retrieval.extract.features import binary_int8_fine, read_features, read_manifest  # noqa: F401 (their old home)
from retrieval.extract.preprocess import DecodePolicy, prepare_items
from retrieval.model.onnx_cache import resolve_runtime
from retrieval.model.task import encode, task_model
from retrieval.progress import Progress
from retrieval.schema import (DICTIONARY_COLUMNS, ERROR_SCHEMA, feature_compression, feature_schema,
                              int8_to_arrow, quantize_int8, vectors_to_arrow)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractJob:
    """Plain, picklable values that a task needs (the model is rebuilt from them per process)."""
    output: str
    role: str
    model_cfg: dict
    preprocess_cfg: dict
    model_version: str
    num_shards: int
    batch_size: int = 32
    storage: str = "float32"
    threads: int | str = "auto"     # a number or auto (the task's cores)
    decode_threads: int | str = "auto"   # decode threads ahead of the forward; auto = threads; 0 = inline
    row_group_size: int = 1024
    progress_seconds: float = 10.0
    key_column: str | None = None
    bytes_column: str | None = None
    faults: dict | None = None
    storage_options: dict | None = None
    pdq: bool = False               # + the PDQ hash columns (schema.PDQ_COLUMNS) from a full decode
    regions: tuple[str, ...] = ()   # query regions (extract.query_regions; role query only)

    def fingerprint(self) -> str:
        d = {k: v for k, v in asdict(self).items()
             if k in ("role", "preprocess_cfg", "model_version", "num_shards", "storage")
             or (k in ("pdq", "regions") and v)}   # without PDQ / regions: the fingerprint of outputs written before them
        # the decoder gives the same rows within tolerance (like model.runtime): shards written by either mix
        d["preprocess_cfg"] = {k: v for k, v in d["preprocess_cfg"].items() if k != "decoder"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def decode_workers(decode_threads: int | str, threads: int | str) -> int:
    """Decode threads for a task: the configured number, else (``auto``) as many as its model threads;
    0 decodes inline, between forwards."""
    if decode_threads == "auto":
        return task_threads(threads)
    return max(0, int(decode_threads))


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}"


# ---------------------------------------------------------------------------------------------
# one shard
def _shard_fingerprint(job: ExtractJob, rows: list[tuple[str, str, str | None]]) -> str:
    h = hashlib.sha256(job.fingerprint().encode())
    for image_id, uri, err in rows:
        h.update(f"{image_id}\t{uri}\t{err or ''}\n".encode())
    return h.hexdigest()[:32]


class _ShardRun:
    """What the phases of :func:`extract_shard` share: the job, the model and the shard's errors, counts and
    timings so far."""

    def __init__(self, job: ExtractJob, shard: int, device: str | None, total: int) -> None:
        self.job, self.shard, self.name = job, shard, shard_name(shard)
        self.model, self.device = task_model(job, device)
        self.runtime = "onnxruntime" if self.model.__dict__.get("_onnx_trunk") is not None \
            and str(self.device) == "cpu" else "torch"
        self.policy = DecodePolicy.from_config(job.preprocess_cfg)
        spec = self.model.spec
        self.sizes = (spec.size_hi,) if job.role == "gallery" else (spec.size_hi, spec.size_lo)
        self.schema = feature_schema(spec.coarse_dim, spec.fine_dim, job.storage, job.pdq, regions=bool(job.regions))
        self.errors: list[tuple[str, str, str]] = []
        self.progress = Progress(f"extract {self.name}", total=total, every=job.progress_seconds, unit="images")
        self.timing = {"decode_s": 0.0, "forward_s": 0.0, "write_s": 0.0}
        self.decode_threads = decode_workers(job.decode_threads, job.threads)
        self.n_ok = 0
        self.n_rows = 0       # feature rows: n_ok, plus the query regions
        self.cpu0 = time.process_time()   # the task's CPU seconds (all its threads) after its model setup


def extract_shard(job: ExtractJob, shard: int, rows: list[tuple[str, str, str | None]],
              device: str | None = None) -> dict:
    """Encode one shard's ``(image_id, uri, listing_error)`` rows and commit its files: the feature
    part, then the errors part, then the marker."""
    t0 = time.monotonic()
    rows = sorted(rows, key=lambda r: (r[0], r[1]))
    run = _ShardRun(job, shard, device, len(rows))
    run.timing["setup_s"] = time.monotonic() - t0     # the model: built by a worker's first task, then cached
    run.errors.extend((image_id, uri, err) for image_id, uri, err in rows if err)   # failed in the listing
    run.progress.update(len(run.errors), errors=len(run.errors))
    readable = [(image_id, uri) for image_id, uri, err in rows if not err]
    part_url = _write_part(run, readable)
    err_url = _write_errors(run)
    return _commit(run, rows, part_url, err_url, t0)


def _decoded(run: _ShardRun, readable: list[tuple[str, str]]) -> Iterator[tuple]:
    """Read and decode the images: one ``(image_id, uri, width, height, tensors, region, pdq)`` per
    feature row (the whole image, region None, then its query regions; ``pdq``: the image's hash,
    quality and dihedral hashes, or None); failures go to the errors."""
    job = run.job
    hashes: list | None = [] if job.pdq else None
    for image_id, uri, tensors, w, h, err in prepare_items(
            readable, run.sizes, run.model.spec.resize, run.policy, job.key_column, job.bytes_column,
            decoder=job.preprocess_cfg.get("decoder", "fast"), workers=run.decode_threads, ahead=2 * job.batch_size,
            pdq=hashes, regions=job.regions):
        if err is not None:
            run.errors.append((image_id, uri, err))
            run.progress.update(1, errors=1)
            continue
        hashed = hashes.pop() if hashes else None
        for region, t in (tensors if job.regions else [(None, tensors)]):
            yield image_id, uri, w, h, t, region, hashed


def _write_part(run: _ShardRun, readable: list[tuple[str, str]]) -> str:
    """Decode, encode (``batch_size`` images per forward) and write ``part-NNNNN.parquet``; its URL."""
    job = run.job
    part_url = fsio.join(job.output, f"{run.name}.parquet")
    with fsio.atomic_open(part_url, "wb") as fh:
        writer = pq.ParquetWriter(fh, run.schema, compression=feature_compression(run.schema),
                                  use_dictionary=DICTIONARY_COLUMNS)
        batch: list[tuple] = []
        t = time.monotonic()     # decode_s: the time the forward waited for decoded images
        with contextlib.closing(_decoded(run, readable)) as items:   # a failed batch stops the decode threads now
            for item in items:
                batch.append(item)
                if len(batch) >= job.batch_size:
                    run.timing["decode_s"] += time.monotonic() - t
                    _write_batch(run, writer, batch)
                    t = time.monotonic()
        run.timing["decode_s"] += time.monotonic() - t
        _write_batch(run, writer, batch)
        writer.close()
    return part_url


def _write_batch(run: _ShardRun, writer: pq.ParquetWriter, batch: list[tuple]) -> None:
    """Encode one batch, write it as row groups of the part, and empty it."""
    if not batch:
        return
    job = run.job
    t = time.monotonic()
    coarse, fine = encode(run.model, job.role, [b[4][0] for b in batch],
                          [b[4][1] for b in batch] if job.role == "query" else [], run.device)
    run.timing["forward_s"] += time.monotonic() - t
    t = time.monotonic()
    cols: dict[str, Any] = {
        "image_id": [b[0] for b in batch], "uri": [b[1] for b in batch],
        "coarse": vectors_to_arrow(coarse.astype(np.float32))}
    if job.storage == "int8":
        q, scale = quantize_int8(fine)
        cols["fine"] = int8_to_arrow(q)
        cols["fine_scale"] = pa.array(scale, pa.float32())
    else:
        cols["fine"] = vectors_to_arrow(fine.astype(np.float32))
    cols.update({"width": pa.array([b[2] for b in batch], pa.int32()),
                 "height": pa.array([b[3] for b in batch], pa.int32()),
                 "model_version": [job.model_version] * len(batch),
                 "role": [job.role] * len(batch)})
    if job.pdq:
        cols.update({"pdq": pa.array([b[6][0] for b in batch], pa.binary(32)),
                     "pdq_quality": pa.array([b[6][1] for b in batch], pa.int32()),
                     "pdq_dihedral": pa.array([b[6][2] for b in batch], pa.binary(224))})
    if job.regions:
        cols["region"] = pa.array([b[5] for b in batch], pa.string())
    writer.write_table(pa.table(cols, schema=run.schema), row_group_size=job.row_group_size)
    run.timing["write_s"] += time.monotonic() - t
    images = sum(1 for b in batch if b[5] is None)
    run.n_ok += images
    run.n_rows += len(batch)
    run.progress.update(images)
    batch.clear()
    faults.maybe_fail(job.faults, "extract", run.shard, run.n_ok + len(run.errors))


def _write_errors(run: _ShardRun) -> str:
    """``errors/part-NNNNN.parquet``: the shard's listing and decoding errors; its URL."""
    errors = run.errors
    err_url = fsio.join(run.job.output, "errors", f"{run.name}.parquet")
    err_table = pa.table({"image_id": [e[0] for e in errors], "uri": [e[1] for e in errors],
                          "error": [e[2] for e in errors]}, schema=ERROR_SCHEMA)
    with fsio.atomic_open(err_url, "wb") as fh:
        pq.write_table(err_table, fh)
    return err_url


def _commit(run: _ShardRun, rows: list[tuple[str, str, str | None]], part_url: str, err_url: str,
            t0: float) -> dict:
    """Write the marker ``_shards/part-NNNNN.json`` (the shard is complete); its stats."""
    n_ok, n_err, name = run.n_ok, len(run.errors), run.name
    stats = {
        "shard": run.shard, "file": f"{name}.parquet", "errors_file": f"errors/{name}.parquet",
        "inputs": len(rows), "ok": n_ok, "errors": n_err, "rows": run.n_rows,
        "sha256": fsio.sha256_file(part_url), "errors_sha256": fsio.sha256_file(err_url),
        "fingerprint": _shard_fingerprint(run.job, rows), "device": run.device, "runtime": run.runtime,
        "attempt": task_attempt(),
        "seconds": round(time.monotonic() - t0, 3),
        # CPU seconds of this process (every thread: decode threads, the model's) while it read, decoded, encoded
        # and wrote the shard (after setup_s): its cost per core where a shared machine's wall time measures
        # the neighbours (tests/bench/bench_decode.py)
        "cpu_s": round(time.process_time() - run.cpu0, 3),
        **{k: round(v, 3) for k, v in run.timing.items()},
    }
    fsio.write_json(fsio.join(run.job.output, "_shards", f"{name}.json"), stats)
    if n_ok + n_err != len(rows):
        raise AssertionError(f"shard {run.shard}: {n_ok} ok + {n_err} errors != {len(rows)} inputs")
    run.progress.finish()
    return stats


# ---------------------------------------------------------------------------------------------
# planning and running
def _arrow_task(job: ExtractJob, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """A shard's task (:meth:`~retrieval.engine.Engine.map_arrow`): these batches are exactly one shard's listing rows."""
    by_shard: dict[int, list[tuple[str, str, str | None]]] = {}
    for b in batches:
        d = b.to_pydict()
        for s, i, u, e in zip(d["shard"], d["image_id"], d["uri"], d["error"]):
            by_shard.setdefault(s, []).append((i, u, e))
    for shard, rows in by_shard.items():
        stats = extract_shard(job, shard, rows)
        yield pa.RecordBatch.from_pydict({"shard": pa.array([shard], pa.int32()),
                                          "stats": pa.array([json.dumps(stats)], pa.string())})


# the rows a shard's task gets, and what it returns (:meth:`retrieval.engine.Engine.map_arrow`)
SHARD_ROWS = pa.schema([("shard", pa.int32()), ("image_id", pa.string()), ("uri", pa.string()),
                        ("error", pa.string())])
SHARD_STATS = pa.schema([("shard", pa.int32()), ("stats", pa.string())])


def _run_shards(engine: Engine, job: ExtractJob, todo: dict[int, list]) -> list[dict]:
    """One task per shard, in shard order (:meth:`~retrieval.engine.Engine.map_arrow`: on Spark a
    partition per shard holding its listing rows as compressed Arrow, not in the task closures;
    locally shard after shard)."""
    order = sorted(todo)
    rows = [(s, i, u, e) for s in order for (i, u, e) in todo[s]]
    listing = pa.table([pa.array([r[n] for r in rows], f.type) for n, f in enumerate(SHARD_ROWS)],
                       schema=SHARD_ROWS)
    out = engine.map_arrow(functools.partial(_arrow_task, job), listing, "shard", SHARD_STATS, "extract",
                           every=job.progress_seconds)
    return [json.loads(st) for st in out.column("stats").to_pylist()]


def _intact(output: str, stats: dict) -> bool:
    """A finished shard's files still match the sha256 its marker recorded (else it is redone)."""
    for key, sha in (("file", "sha256"), ("errors_file", "errors_sha256")):
        if not (stats.get(key) and stats.get(sha)):
            return False
        url = fsio.join(output, fsio.safe_relpath(stats[key]))
        try:
            ok = fsio.sha256_file(url) == stats[sha]
        except FileNotFoundError:
            ok = False
        if not ok:
            log.warning("%s is missing or does not match the sha256 of its marker: recomputing shard %s",
                        url, stats.get("shard"))
            return False
    return True


def plan_shards(listing: pa.Table, job: ExtractJob, mode: str) -> tuple[dict[int, list], dict[int, dict]]:
    """Split the listing by shard; return (shards to run, finished shards' stats to keep)."""
    by_shard: dict[int, list[tuple[str, str, str | None]]] = {}
    d = listing.to_pydict()
    for i, u, s, e in zip(d["image_id"], d["uri"], d["shard"], d["error"]):
        by_shard.setdefault(s, []).append((i, u, e))
    todo, done = {}, {}
    for shard, rows in sorted(by_shard.items()):
        marker = fsio.join(job.output, "_shards", f"{shard_name(shard)}.json")
        if mode == "incremental" and fsio.exists(marker):
            try:
                stats = fsio.read_json(marker)
            except Exception:
                stats = {}
            if stats.get("fingerprint") == _shard_fingerprint(job, sorted(rows, key=lambda r: (r[0], r[1]))) \
                    and _intact(job.output, stats):
                done[shard] = stats
                continue
        todo[shard] = rows
    return todo, done


@outputs.leased
def extract(input_url: str, output_url: str, cfg: Config, engine: Engine | Any = None) -> dict:
    """Run the extraction job on ``engine`` (:func:`retrieval.engine.as_engine`: an engine, a
    Spark session, or None for this process); returns the manifest."""
    from retrieval.model.checkpoints import model_from_config

    t0 = time.monotonic()
    engine = as_engine(engine)
    extract_cfg = cfg.extract
    outputs.configure_and_check_writable(output_url, cfg["io.storage_options"])
    model = model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict())
    listing = inputs_mod.list_inputs(input_url, extract_cfg.input_format, extract_cfg.num_shards,
                                     extract_cfg.key_column, extract_cfg.bytes_column)
    t_list = time.monotonic() - t0
    if extract_cfg.pdq and not hashing.available():
        raise RuntimeError(f"extract.pdq=true: {hashing.INSTALL_HINT}")
    outputs.claim(output_url, outputs.identity("extract", cfg, [input_url], extract_cfg.role), cfg,
                  overwrite=extract_cfg.mode == "overwrite")
    job = ExtractJob(output=output_url, role=extract_cfg.role,
                     model_cfg=resolve_runtime(cfg["model"].to_dict(), model, output_url, engine.tasks_on_this_machine),
                     preprocess_cfg=cfg["preprocess"].to_dict(), model_version=model.model_version(),
                     num_shards=extract_cfg.num_shards, batch_size=extract_cfg.batch_size, storage=extract_cfg.storage,
                     threads=extract_cfg.threads, decode_threads=extract_cfg.decode_threads,
                     row_group_size=extract_cfg.row_group_size,
                     progress_seconds=extract_cfg.progress_seconds, key_column=extract_cfg.key_column,
                     bytes_column=extract_cfg.bytes_column, faults=faults.configured(),
                     storage_options=cfg["io.storage_options"], pdq=bool(extract_cfg.pdq),
                     regions=tuple(extract_cfg.query_regions) if extract_cfg.role == "query" else ())
    outputs.begin(output_url)
    todo, done = plan_shards(listing, job, extract_cfg.mode)
    fsio.remove_stale(output_url, "part", ("errors", "_shards"), keep=set(todo) | set(done))
    log.info("extract %s -> %s: %d images, %d shards to run, %d already complete",
             input_url, output_url, listing.num_rows, len(todo), len(done))
    t1 = time.monotonic()
    if not todo:
        results = []
    else:       # one bar for the stage, in images (local: the shards' own progress counts into it)
        with engine.progress("extract", sum(map(len, todo.values())), "images", extract_cfg.progress_seconds):
            results = _run_shards(engine, job, todo)
    t_run = time.monotonic() - t1
    fsio.remove_stale(output_url, "part", ("errors", "_shards"), keep=None)   # leftovers of killed attempts
    shards = sorted([*done.values(), *results], key=lambda s: s["shard"])
    counts = {"inputs": listing.num_rows, "ok": sum(s["ok"] for s in shards),
              "errors": sum(s["errors"] for s in shards), "shards": len(shards),
              "shards_skipped": len(done), "shards_run": len(results),
              "rows": sum(s.get("rows", s["ok"]) for s in shards)}
    if counts["ok"] + counts["errors"] != counts["inputs"]:
        raise AssertionError(f"counts do not add up: {counts}")
    images_run = sum(s["inputs"] for s in results)
    manifest = outputs.commit(output_url, "extract", {
        "role": extract_cfg.role, "input": input_url, "output": output_url,
        "model_version": job.model_version, "model": model.metadata(),
        "heads": model.spec.heads, "storage": extract_cfg.storage, "pdq": job.pdq, "query_regions": list(job.regions),
        "runtime": {"configured": job.model_cfg.get("runtime"), "onnx_file": job.model_cfg.get("onnx_file")},
        "schema": feature_schema(model.spec.coarse_dim, model.spec.fine_dim, extract_cfg.storage, job.pdq,
                                 regions=bool(job.regions)).to_string(),
        "counts": counts, "shards": shards,
        "timings": {"listing_s": round(t_list, 3), "run_s": round(t_run, 3),
                    "total_s": round(time.monotonic() - t0, 3),
                    "images_per_s": round(images_run / t_run, 2) if t_run > 0 and images_run else None},
    }, engine=engine, cfg=cfg)
    log.info("extract done: %d ok, %d errors, %d shards (%d skipped) in %.1fs -> %s",
             counts["ok"], counts["errors"], counts["shards"], counts["shards_skipped"],
             manifest["timings"]["total_s"], output_url)
    return manifest
