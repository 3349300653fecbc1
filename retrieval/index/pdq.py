"""The PDQ hash index beside the IVF-PQ shards (``<index>/pdq/``), built by ``retrieval index`` when
the gallery features carry PDQ hashes (``extract.pdq=true``), read by ``retrieval pdq match``.

Sharded like the IVF-PQ shards: consecutive feature files are grouped into shards of at most
``pdq.shard_rows`` rows, and each shard is built by its own task into
``pdq/shard-NNNNN/`` (no task and no driver holds the whole index; ``retrieval pdq match`` runs one
task per (list chunk, shard) and merges per chunk). Files per shard (each listed with its sha256 in
the index manifest's ``pdq`` block, whose ``shards`` give each shard's count and row offset):

- ``hashes.parquet``: one row per indexed image, ``image_id``, ``uri``, ``pdq``, ``pdq_quality``;
  the row number is the id in the shard's binary indexes (plus the shard's offset: the row in the
  whole index, which orders ties as one unsharded index would);
- ``hashes.index``: a faiss ``IndexBinaryMultiHash`` over the hashes: the 256 bits cut into
  :data:`NHASH` substrings of 16 bits, each a hash table. A range search within ``r`` bits probes,
  in each table, the keys within ``nflip`` bits of the query's substring. ``pdq.exact=true``:
  ``nflip = r // NHASH`` (``auto``), exact: two hashes within ``r`` bits agree to within
  ``r // NHASH`` bits on at least one substring (pigeonhole). ``nflip = 0`` (the default, ``pdq.exact=false``) probes
  each substring's own bucket only: it misses a pair only when every one of the 16 substrings
  differs, and is ~30x faster at 1M hashes (faiss's probes cost more than a scan: measured in
  tests/bench/bench_pdq.py). The build measures both against a brute-force scan and records their
  recall in the manifest;
- ``dihedral.index``: the same over the 7 rotations / flips of every image (id = row x 7 +
  variant, :data:`retrieval.hashing.DIHEDRAL` order), searched with ``pdq.dihedral=true``.

The index holds every feature file's rows (old and new): an append rebuilds it (seconds per
million hashes per task, measured in tests/bench/bench_pdq.py). Duplicate image ids follow
``index.duplicates`` (skip: the first row, in feature-file order, found by the engine's
:func:`retrieval.index.dedup.find` over the files that carry hashes).
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import fsio, hashing
from retrieval.index.reader import FeatureFile

log = logging.getLogger(__name__)

DIR = "pdq"
NHASH = 16                      # substrings of 256 / NHASH = 16 bits
HASHES, PRIMARY, DIHEDRAL = f"{DIR}/hashes.parquet", f"{DIR}/hashes.index", f"{DIR}/dihedral.index"
HASH_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("pdq", pa.binary(32)),
                         ("pdq_quality", pa.int32())])
RECALL_QUERIES = 500


def carries_hashes(storage_options: dict | None, f: FeatureFile) -> bool:
    """A task: whether one feature file carries PDQ hashes (its footer's schema)."""
    fsio.configure(storage_options)
    return "pdq" in fsio.parquet_file(f.url).schema_arrow.names


def _extracted_with_pdq(output_url: str) -> bool:
    """Whether an extraction output's manifest says it stored PDQ hashes (True when unknown)."""
    from retrieval import outputs

    try:
        manifest = outputs.find(output_url, "extract")
    except Exception:    # an unreadable manifest: let the footers decide
        return True
    return manifest is None or bool(manifest.get("pdq", False))


def shard_groups(files: Sequence[FeatureFile], per_shard: int) -> list[list[FeatureFile]]:
    """Consecutive feature files grouped into PDQ shards of at most ``per_shard`` rows (at least one file
    each), in feature-file order, so a shard's row order is the gallery's."""
    groups: list[list[FeatureFile]] = []
    rows = 0
    for f in files:
        if not groups or rows + f.rows > per_shard:
            groups.append([])
            rows = 0
        groups[-1].append(f)
        rows += f.rows
    return groups


@dataclass(frozen=True)
class ShardJob:
    output: str
    storage_options: dict | None
    max_distance: int = hashing.DEFAULT_MAX_DISTANCE


def shard_dir(shard: int) -> str:
    return f"{DIR}/shard-{shard:05d}"


def _shard_rows(files: Sequence[FeatureFile], skip: Any) -> pa.Table:
    """The shard's rows to index: non-null hashes, less the duplicate rows in ``skip``."""
    tables = []
    for f in files:
        t = fsio.read_parquet(f.url, columns=["image_id", "uri", "pdq", "pdq_quality", "pdq_dihedral"])
        keep = np.asarray(t.column("pdq").is_valid())
        keep[skip.rows_in(f.file_no, 0, t.num_rows)] = False
        tables.append(t.filter(pa.array(keep)))
    return pa.concat_tables(tables)


def build_shard(job: ShardJob, skip: Any, item: tuple[int, list[FeatureFile]]) -> dict:
    """A task: one PDQ shard (``pdq/shard-NNNNN/``: hash rows, primary and dihedral multi-hash) from its
    feature files; its manifest entry (files with sha256, counts, recall against brute force)."""
    import faiss

    shard, files = item
    fsio.configure(job.storage_options)
    table = _shard_rows(files, skip)
    codes = hashing.matrix(table.column("pdq").to_pylist())
    primary = multihash(codes)
    dihedral = multihash(hashing.matrix(b"".join(table.column("pdq_dihedral").to_pylist())))
    sink = pa.BufferOutputStream()
    pq.write_table(table.select(HASH_SCHEMA.names).cast(HASH_SCHEMA), sink)
    out = []
    for name, data in ((HASHES, sink.getvalue().to_pybytes()),
                       (PRIMARY, faiss.serialize_index_binary(primary).tobytes()),
                       (DIHEDRAL, faiss.serialize_index_binary(dihedral).tobytes())):
        name = name.replace(DIR, shard_dir(shard), 1)
        fsio.write_bytes(fsio.join(job.output, name), data)
        out.append({"file": name, "sha256": fsio.sha256_bytes(data), "bytes": len(data)})
    recall = {f"nflip={f}": measured_recall(primary, codes, job.max_distance, seed=shard, nflip=f) for f in (0, "auto")}
    return {"shard": shard, "count": len(codes), "dihedral": int(dihedral.ntotal), "files": out, "quality": recall}


def multihash(codes: np.ndarray) -> Any:
    import faiss

    index = faiss.IndexBinaryMultiHash(hashing.BITS, NHASH, hashing.BITS // NHASH)
    if len(codes):
        index.add(np.ascontiguousarray(codes, dtype=np.uint8))
    return index


def range_search(index: Any, queries: np.ndarray, max_distance: int,
                 nflip: int | str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lims, distances, ids) of the indexed hashes within ``max_distance`` bits of each query
    (faiss's radius is exclusive: ``max_distance + 1``); ``nflip`` as the module doc says (``auto``:
    exact)."""
    import faiss

    if isinstance(index, faiss.IndexBinaryMultiHash):
        index.nflip = max(0, int(max_distance) // index.nhash) if nflip == "auto" else int(nflip)
    lims, dist, ids = index.range_search(np.ascontiguousarray(queries, dtype=np.uint8), int(max_distance) + 1)
    return lims.astype(np.int64), dist.astype(np.int32), ids.astype(np.int64)


def measured_recall(index: Any, codes: np.ndarray, max_distance: int, seed: int = 0,
                    n: int = RECALL_QUERIES, nflip: int | str = "auto") -> dict:
    """The index's recall against a brute-force scan (``IndexBinaryFlat``) for queries made from
    indexed hashes with 0..``max_distance`` random bits flipped."""
    import faiss

    if not len(codes):
        return {"queries": 0}
    rng = np.random.default_rng(seed)
    queries = codes[rng.integers(0, len(codes), min(n, len(codes)))].copy()
    bits = np.unpackbits(queries, axis=1)
    for row, k in zip(bits, rng.integers(0, max_distance + 1, len(bits))):
        flip = rng.choice(hashing.BITS, int(k), replace=False)
        row[flip] ^= 1
    queries = np.packbits(bits, axis=1)
    flat = faiss.IndexBinaryFlat(hashing.BITS)
    flat.add(codes)
    t = time.monotonic()
    lims, _, ids = range_search(index, queries, max_distance, nflip)
    t_index = time.monotonic() - t
    t = time.monotonic()
    flims, _, fids = range_search(flat, queries, max_distance)
    t_flat = time.monotonic() - t
    found = sum(len(set(ids[lims[i]:lims[i + 1]]) & set(fids[flims[i]:flims[i + 1]])) for i in range(len(queries)))
    return {"queries": len(queries), "max_distance": int(max_distance), "nflip": nflip,
            "pairs_brute_force": int(flims[-1]), "found": int(found),
            "recall_vs_brute_force": round(found / max(int(flims[-1]), 1), 6),
            "index_ms_per_query": round(1000 * t_index / len(queries), 4),
            "brute_force_ms_per_query": round(1000 * t_flat / len(queries), 4)}


def _remove_stale(output_url: str, shards: int) -> None:
    """Remove the PDQ files of an earlier build that this one does not write (more shards, or the
    unsharded ``pdq/hashes.*`` of before sharding)."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(fsio.join(output_url, DIR))
    if not fs.exists(root):
        return
    for p in fs.ls(root, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        number = base[len("shard-"):]
        if not (base.startswith("shard-") and number.isdigit() and int(number) < shards):
            fs.rm(p, recursive=True)


def _recall_of(shards: list[dict]) -> dict:
    """The shards' recall measurements pooled (pairs found / pairs brute force, over every shard)."""
    out = {}
    for key in shards[0]["quality"]:
        parts = [s["quality"][key] for s in shards if s["quality"][key].get("queries")]
        pairs = sum(p["pairs_brute_force"] for p in parts)
        found = sum(p["found"] for p in parts)
        out[key] = {"queries": sum(p["queries"] for p in parts), "max_distance": hashing.DEFAULT_MAX_DISTANCE,
                    "nflip": key.split("=", 1)[1], "pairs_brute_force": pairs, "found": found,
                    "recall_vs_brute_force": round(found / max(pairs, 1), 6), "shards": len(parts)}
    return out


def build(engine: Any, files: Sequence[FeatureFile], output_url: str, duplicates: str,
          storage_options: dict | None, every: float = 10.0, per_shard: int = 10_000_000) -> dict | None:
    """Build ``<index>/pdq/`` from every feature file that carries PDQ hashes: one task per shard of
    consecutive files (``per_shard`` rows: ``pdq.shard_rows``), each writing its own binary
    indexes; the manifest's ``pdq`` block (None: no file carries them, nothing is written)."""
    from retrieval.index import dedup

    t0 = time.monotonic()
    if not any(_extracted_with_pdq(out) for out in {f.output for f in files}):
        return None      # no extraction asked for hashes (its manifest): no task, no bar
    carries = engine.map(functools.partial(carries_hashes, storage_options), list(files), "index pdq", every)
    with_hashes = [f for f, c in zip(files, carries) if c]
    if not with_hashes:
        return None
    if len(with_hashes) < len(files):
        log.warning("index pdq: %d of %d feature files carry no PDQ hashes (extracted without extract.pdq): "
                    "their images are not in the PDQ index", len(files) - len(with_hashes), len(files))
    # duplicates=skip: the first row of each image id among the files with hashes (found by the engine)
    skip = dedup.find(engine, with_hashes, with_hashes[0].file_no, storage_options) if duplicates == "skip" \
        else dedup.Duplicates()
    groups = list(enumerate(shard_groups(with_hashes, max(1, int(per_shard)))))
    _remove_stale(output_url, len(groups))
    shards = engine.map(functools.partial(build_shard, ShardJob(output_url, storage_options), skip), groups,
                        "index pdq shards", every)
    shards = sorted(shards, key=lambda s: s["shard"])
    build_s = time.monotonic() - t0
    quality = _recall_of(shards)
    count = sum(s["count"] for s in shards)
    log.info("index pdq: %d hashes (+%d dihedral) in %d shards, %.1fs; recall vs brute force %s", count,
             sum(s["dihedral"] for s in shards), len(shards), build_s,
             {k: v.get("recall_vs_brute_force") for k, v in quality.items()})
    return {"count": count, "dihedral": sum(s["dihedral"] for s in shards),
            "index": f"IndexBinaryMultiHash(nhash={NHASH}, b=16) per shard",
            "shards": [{"shard": s["shard"], "count": s["count"], "offset": sum(t["count"] for t in shards[:i]),
                        "files": [f["file"] for f in s["files"]]} for i, s in enumerate(shards)],
            "files": [f for s in shards for f in s["files"]], "quality": quality, "build_s": round(build_s, 3)}


@dataclass
class PdqIndex:
    """The loaded ``<index>/pdq/``: the hash rows and the two binary indexes."""
    hashes: pa.Table
    primary: Any
    dihedral: Any


def load(index_url: str, manifest: dict, shard: int = 0) -> PdqIndex:
    """Read one shard of ``<index>/pdq/`` (files checked against the manifest's sha256); a clear error
    when the index has no PDQ hashes."""
    import faiss

    block = manifest.get("pdq")
    if not block:
        raise ValueError(f"{index_url} has no PDQ hash index: extract the gallery with --set extract.pdq=true, "
                         "then build the index again")
    data = {}
    for f in block["files"]:
        if not f["file"].startswith(shard_dir(shard) + "/"):
            continue
        raw = fsio.read_bytes(fsio.join(index_url, f["file"]))
        if fsio.sha256_bytes(raw) != f["sha256"]:
            raise ValueError(f"{fsio.join(index_url, f['file'])} does not match the sha256 in the index manifest")
        data[f["file"].replace(shard_dir(shard), DIR, 1)] = raw
    hashes = pq.read_table(pa.BufferReader(data[HASHES]))
    as_index = lambda raw: faiss.deserialize_index_binary(np.frombuffer(raw, dtype=np.uint8))  # noqa: E731
    return PdqIndex(hashes=hashes, primary=as_index(data[PRIMARY]), dihedral=as_index(data[DIHEDRAL]))


# ---------------------------------------------------------------------------------------------
# the capacity plan's line (retrieval/plan.py): rates measured by tests/bench/bench_pdq.py --skip-quality
PLAN_RATES = {
    # tests/bench/bench_pdq.py --skip-quality (6 Dec 2026, shared 2-core machine): 1,000,000 random
    # hashes added to IndexBinaryMultiHash(16 x 16 bits) in 13.8 s (21.0 s in a busier run), one core
    "pdq_add_hashes_per_s": 72_000.0,
    # its serialized bytes per hash at 1M: 76.7 (32 B of code + the 16 hash tables' entries)
    "pdq_index_bytes_per_hash": 76.7,
    # a listed hash's range search <= 31 bits against 1M gallery hashes, one core, pdq.exact=false:
    # 0.205 ms, recall vs brute force 0.988 (exact: 6.4 ms; a brute-force scan: 4.3-4.5 ms); the
    # 16-bit buckets fill linearly with N, so it grows ~ linearly with N
    "pdq_match_ms_per_hash_1m": 0.205,
}
PLAN_LIST = 1_000_000       # the partner list the plan line assumes


def plan_line(n: int, cores: int, chunk_rows: int = 100_000, shard_rows: int = 2_000_000) -> dict:
    """The plan's ``pdq`` stage: the sharded build (a task per ``shard_rows`` images: primary + 7
    dihedral hashes each), storage, and one match of a :data:`PLAN_LIST`-hash list (a task per
    (chunk, shard), each loading one shard)."""
    r = PLAN_RATES
    hashes, shards = 8 * n, max(1, -(-n // shard_rows))
    per_shard = min(n, shard_rows)
    build_task_s = 8 * per_shard / r["pdq_add_hashes_per_s"]
    build_s = -(-shards // max(1, cores)) * build_task_s
    tasks = max(1, -(-PLAN_LIST // chunk_rows)) * shards
    match_task_s = min(chunk_rows, PLAN_LIST) * r["pdq_match_ms_per_hash_1m"] / 1000 * max(1.0, per_shard / 1e6)
    match_s = -(-tasks // max(1, cores)) * match_task_s
    size = hashes * r["pdq_index_bytes_per_hash"]
    return {"tasks": tasks, "wall": build_s + match_s, "storage": size,
            "memory_per_task": 1.2 * 8 * per_shard * r["pdq_index_bytes_per_hash"],
            "basis": (f"PDQ index (extract.pdq): {shards:,} shards of {per_shard:,} images (pdq.shard_rows), "
                      f"built by a task each: {build_s:,.0f} s ({hashes:.3g} hashes incl. dihedral at "
                      f"{r['pdq_add_hashes_per_s']:,.0f}/s per core); match a {PLAN_LIST:,}-hash list: "
                      f"{tasks:,} tasks (chunk x shard), {match_s:,.0f} s")}
