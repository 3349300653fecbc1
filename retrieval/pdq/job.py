"""``retrieval pdq export`` and ``retrieval pdq match`` (docs/lifecycle.md "PDQ hash lists").

- export: a feature output's PDQ hashes (``extract.pdq=true``) -> one CSV file with the columns
  ``hash`` (64 hex digits), ``image_id``, ``quality``: the form ThreatExchange / HMA hash lists take.
- match: such a list (any ids: a partner's) against the PDQ index that ``retrieval index`` built
  beside the IVF-PQ shards (:mod:`retrieval.index.pdq`); one task per (``pdq.chunk_rows`` listed
  hashes, PDQ shard) range-searches that shard's binary index within ``pdq.max_distance`` bits
  (exact: see that module); its candidates (at most ``pdq.top_k`` per hash) come back, and one task
  per chunk merges them and writes ``part-NNNNN.parquet`` in the result schema (:data:`retrieval.schema.RESULT_SCHEMA`:
  ``signal`` = "pdq", ``distance`` = the Hamming distance, ``score`` = ``1 - 2 distance / 256``),
  so ``retrieval report`` and ``retrieval evaluate`` read it as they read a search output. A listed
  line that is not a hash is an error row (``errors/part-00000.parquet``), not a failure.
"""
from __future__ import annotations

import csv
import functools
import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from retrieval import fsio, hashing, outputs
from retrieval.config import Config
from retrieval.engine import Engine, as_engine
from retrieval.extract.features import read_features, read_manifest
from retrieval.index import pdq as pdq_index
from retrieval.index.store import read_index_manifest
from retrieval.schema import ERROR_SCHEMA, RESULT_SCHEMA, RESULT_SCHEMA_VERSION, conform_results

log = logging.getLogger(__name__)

EXPORT_HEADER = ("hash", "image_id", "quality")
ID_COLUMNS = ("image_id", "id", "content_id")      # the list's id column: the first present


# ---------------------------------------------------------------------------------------------
# export
@outputs.leased
def export(features_url: str, output: str, cfg: Config, overwrite: bool = False) -> dict:
    """Write the CSV hash list of a feature output; returns what was written (no marker: one file)."""
    t0 = time.monotonic()
    fsio.configure(cfg["io.storage_options"])
    outputs.claim(output, outputs.identity("pdq", cfg, [features_url]), cfg, overwrite, file=True)
    manifest = read_manifest(features_url)
    if not manifest.get("pdq"):
        raise ValueError(f"{features_url} holds no PDQ hashes: extract it with --set extract.pdq=true")
    regions = bool(manifest.get("query_regions"))
    table = read_features(features_url, columns=["image_id", "pdq", "pdq_quality"] + (["region"] if regions else []))
    if regions:     # query features: the image's hash once, from its whole-image row (region null)
        table = table.filter(pc.is_null(table.column("region"))).drop_columns(["region"])
    quality = np.asarray(table.column("pdq_quality").fill_null(-1))
    keep = quality >= int(cfg["pdq.min_quality"])
    rows = table.filter(pa.array(keep))
    sink = io.StringIO()
    writer = csv.writer(sink, lineterminator="\n")
    writer.writerow(EXPORT_HEADER)
    writer.writerows(zip((h.hex() for h in rows.column("pdq").to_pylist()), rows.column("image_id").to_pylist(),
                         rows.column("pdq_quality").to_pylist()))
    fsio.write_bytes(output, sink.getvalue().encode())
    counts = {"images": table.num_rows, "written": rows.num_rows, "low_quality": int((~keep).sum())}
    log.info("pdq export %s -> %s: %d hashes (%d under pdq.min_quality %s)", features_url, output,
             counts["written"], counts["low_quality"], cfg["pdq.min_quality"])
    return {"stage": "pdq", "action": "export", "features": features_url, "output": output, "counts": counts,
            "timings": {"total_s": round(time.monotonic() - t0, 3)}}


# ---------------------------------------------------------------------------------------------
# reading a hash list
def read_hash_list(url: str, min_quality: int = 0) -> tuple[pa.Table, pa.Table, int]:
    """A CSV hash list -> (rows ``image_id``, ``hash`` (32 bytes), ``quality``; error rows; rows under
    ``min_quality``). Lines whose hash is not 64 hex digits are error rows (``uri`` = ``URL#line``)."""
    try:
        data = fsio.read_bytes(url)
        # every column as text: ids such as 00042 keep their zeros, an all-digit hash stays a hash
        header = next(csv.reader([data.split(b"\n", 1)[0].decode("utf-8-sig", "replace")]), [])
        table = pacsv.read_csv(pa.BufferReader(data), read_options=pacsv.ReadOptions(column_names=None),
                               convert_options=pacsv.ConvertOptions(
                                   strings_can_be_null=True, column_types={c: pa.string() for c in header}))
    except FileNotFoundError:
        raise FileNotFoundError(f"hash list {url} not found") from None
    except pa.ArrowInvalid as exc:
        raise ValueError(f"hash list {url} is not a readable CSV: {exc}") from None
    names = [n.strip().lower() for n in table.column_names]
    table = table.rename_columns(names)
    id_col = next((c for c in ID_COLUMNS if c in names), None)
    if "hash" not in names or id_col is None:
        raise ValueError(f"hash list {url}: needs the columns hash and image_id (got {', '.join(names)})")
    ids = [None if v is None else str(v) for v in table.column(id_col).to_pylist()]
    quality = table.column("quality").to_pylist() if "quality" in names else [None] * table.num_rows
    good_ids, good_hashes, good_q, errors, low = [], [], [], [], 0
    for line, (image_id, text, q) in enumerate(zip(ids, table.column("hash").to_pylist(), quality), start=2):
        try:
            h = hashing.from_hex("" if text is None else str(text))
            q = None if q in (None, "") else int(q)
        except ValueError as exc:
            errors.append((image_id or f"line {line}", f"{url}#{line}", str(exc)))
            continue
        if q is not None and q < min_quality:
            low += 1
            continue
        good_ids.append(image_id or f"line {line}")
        good_hashes.append(h)
        good_q.append(q)
    rows = pa.table({"image_id": pa.array(good_ids, pa.string()), "hash": pa.array(good_hashes, pa.binary(32)),
                     "quality": pa.array(good_q, pa.int32())})
    err = pa.table([pa.array([e[i] for e in errors], pa.string()) for i in range(3)], schema=ERROR_SCHEMA)
    return rows, err, low


# ---------------------------------------------------------------------------------------------
# matching: one task per chunk of the list
@dataclass(frozen=True)
class MatchJob:
    index_url: str
    output: str
    max_distance: int
    dihedral: bool
    top_k: int
    storage_options: dict | None
    nflip: int | str = 0


_LOADED: dict[str, Any] = {}      # a task process's loaded PDQ index, by index URL + manifest sha


def _index_of(job: MatchJob, shard: int) -> tuple[pdq_index.PdqIndex, np.ndarray | None]:
    """The PDQ shard and which of its rows are removed images (the index's takedown list: the PDQ
    index keeps their hashes until it is built again, ``retrieval remove`` leaves it as it is)."""
    from retrieval.index.takedowns import read_list

    manifest = read_index_manifest(job.index_url)
    listed = (((manifest.get("takedowns") or {}).get("list")) or {}).get("sha256")
    key = f"{job.index_url}|{shard}|{listed}|" + str([f["sha256"] for f in manifest["pdq"]["files"]])
    if key not in _LOADED:
        _LOADED.clear()
        index = pdq_index.load(job.index_url, manifest, shard)
        removed = read_list(job.index_url).column("image_id").combine_chunks() if listed else None
        dead = np.asarray(pc.is_in(index.hashes.column("image_id"), value_set=removed)) \
            if removed is not None and len(removed) else None
        _LOADED[key] = (index, dead)
    return _LOADED[key]


def nearest(index: pdq_index.PdqIndex, queries: np.ndarray, max_distance: int, dihedral: bool,
            top_k: int, nflip: int | str = 0, dead: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, gallery row, distance) of every gallery image within ``max_distance`` bits of each
    query (with ``dihedral``: of any of its 8 rotations / flips, the smallest distance), at most
    ``top_k`` per query, by query then distance then gallery row; gallery rows ``dead`` (removed)
    left out."""
    lims, dist, ids = pdq_index.range_search(index.primary, queries, max_distance, nflip)
    q = np.repeat(np.arange(len(queries)), np.diff(lims))
    if dihedral:
        dl, dd, di = pdq_index.range_search(index.dihedral, queries, max_distance, nflip)
        q = np.concatenate([q, np.repeat(np.arange(len(queries)), np.diff(dl))])
        ids, dist = np.concatenate([ids, di // len(hashing.DIHEDRAL)]), np.concatenate([dist, dd])
    if dead is not None and len(ids):
        live = ~dead[ids]
        q, ids, dist = q[live], ids[live], dist[live]
    order = np.lexsort((ids, dist, q))
    q, ids, dist = q[order], ids[order], dist[order]
    first = np.ones(len(q), bool)           # one row per (query, gallery image): its smallest distance
    if len(q):
        pair = q.astype(np.int64) * (1 << 40) + ids
        _, idx = np.unique(pair, return_index=True)
        first[:] = False
        first[idx] = True
    q, ids, dist = q[first], ids[first], dist[first]
    order = np.lexsort((ids, dist, q))
    q, ids, dist = q[order], ids[order], dist[order]
    rank = np.arange(len(q)) - np.searchsorted(q, q)       # 0-based rank within its query
    keep = rank < top_k
    return q[keep], ids[keep], dist[keep]


def match_shard(job: MatchJob, item: tuple[int, int, int, pa.Table]) -> tuple[int, pa.Table]:
    """A task: one chunk of the list against one PDQ shard -> its candidates (query row, gallery row in
    the whole index, distance, gallery id and uri), at most ``top_k`` per query."""
    chunk, shard, offset, rows = item
    fsio.configure(job.storage_options)
    index, dead = _index_of(job, shard)
    q, g, d = nearest(index, hashing.matrix(rows.column("hash").to_pylist()), job.max_distance, job.dihedral,
                      job.top_k, job.nflip, dead)
    taken = pa.array(g, pa.int64())
    return chunk, pa.table({"q": pa.array(q, pa.int64()), "row": pa.array(g + offset, pa.int64()),
                            "distance": pa.array(d.astype(np.int32)),
                            "gallery_id": index.hashes.column("image_id").take(taken),
                            "gallery_uri": index.hashes.column("uri").take(taken)})


def write_chunk(job: MatchJob, item: tuple[int, pa.Table, list[pa.Table]]) -> dict:
    """A task: one chunk's candidates from every shard merged (by query, distance, gallery row: the
    order one unsharded index gives), ``top_k`` per query -> ``part-NNNNN.parquet``; its file entry."""
    chunk, rows, found = item
    fsio.configure(job.storage_options)
    cand = pa.concat_tables(found)
    q, g, d = (np.asarray(cand.column(c), np.int64) for c in ("q", "row", "distance"))
    order = np.lexsort((g, d, q))
    rank = np.arange(len(q)) - np.searchsorted(q[order], q[order]) + 1
    order = order[rank <= job.top_k]
    rank = rank[rank <= job.top_k]
    cand, q, d = cand.take(pa.array(order, pa.int64())), q[order], d[order]
    score = pa.array(hashing.similarity(d), pa.float32())
    table = conform_results(pa.table({
        "query_id": rows.column("image_id").take(pa.array(q, pa.int64())), "rank": pa.array(rank.astype(np.int32)),
        "gallery_id": cand.column("gallery_id"), "score": score, "coarse_score": score,
        "query_uri": pa.array(["pdq:" + h.hex() for h in rows.column("hash").take(pa.array(q, pa.int64())).to_pylist()],
                              pa.string()),
        "gallery_uri": cand.column("gallery_uri"),
        "signal": pa.array(["pdq"] * len(q), pa.string()), "distance": pa.array(d.astype(np.int32)),
    }))
    name = f"part-{chunk:05d}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    fsio.write_bytes(fsio.join(job.output, name), data)
    return {"file": name, "sha256": fsio.sha256_bytes(data), "rows": table.num_rows,
            "queries": rows.num_rows, "matched": int(len(np.unique(q)))}


@outputs.leased
def match(hash_list_url: str, index_url: str, output: str, cfg: Config, engine: Engine | Any = None,
          overwrite: bool = False) -> dict:
    """Match a hash list against an index's PDQ hashes on ``engine``; returns the manifest."""
    t0 = time.monotonic()
    engine = as_engine(engine)
    pcfg = cfg["pdq"]
    outputs.configure_and_check_writable(output, cfg["io.storage_options"])
    if not read_index_manifest(index_url).get("pdq"):
        pdq_index.load(index_url, read_index_manifest(index_url))       # raises: no PDQ hashes
    rows, errors, low = read_hash_list(hash_list_url, int(pcfg["min_quality"]))
    outputs.claim(output, outputs.identity("pdq", cfg, [hash_list_url, index_url]), cfg, overwrite)
    outputs.begin(output)
    step = int(pcfg["chunk_rows"])
    chunks = [(i, rows.slice(start, step)) for i, start in enumerate(range(0, rows.num_rows, step))]
    fsio.remove_stale(output, "part", ("errors",), keep=set(range(len(chunks))))
    job = MatchJob(index_url=index_url, output=output, max_distance=int(pcfg["max_distance"]),
                   dihedral=bool(pcfg["dihedral"]), top_k=int(pcfg["top_k"]), storage_options=cfg["io.storage_options"],
                   nflip="auto" if pcfg["exact"] else 0)
    t1 = time.monotonic()
    shards = read_index_manifest(index_url)["pdq"]["shards"]
    every = float(pcfg["progress_seconds"])
    # one task per (chunk, shard): each loads one shard; then one task per chunk merges and writes its part
    found = engine.map(functools.partial(match_shard, job), [(c, s["shard"], s["offset"], rows)
                                                             for s in shards for c, rows in chunks], "pdq match", every)
    items = [(c, rows, [t for fc, t in found if fc == c]) for c, rows in chunks]
    files = engine.map(functools.partial(write_chunk, job), items, "pdq match write", every)
    t_match = time.monotonic() - t1
    err_sink = pa.BufferOutputStream()
    pq.write_table(errors, err_sink)
    err_data = err_sink.getvalue().to_pybytes()
    fsio.write_bytes(fsio.join(output, "errors", "part-00000.parquet"), err_data)
    counts = {"listed": rows.num_rows + errors.num_rows + low, "queries": rows.num_rows, "errors": errors.num_rows,
              "low_quality": low, "matched_queries": sum(f["matched"] for f in files),
              "rows": sum(f["rows"] for f in files)}
    log.info("pdq match %s vs %s: %d hashes, %d matched (%d rows), %d bad lines -> %s", hash_list_url, index_url,
             counts["queries"], counts["matched_queries"], counts["rows"], counts["errors"], output)
    return outputs.commit(output, "pdq", {
        "action": "match", "hash_list": hash_list_url, "index": index_url, "output": output,
        "schema": RESULT_SCHEMA.to_string(), "schema_version": RESULT_SCHEMA_VERSION, "signal": "pdq",
        "params": {"max_distance": job.max_distance, "dihedral": job.dihedral, "top_k": job.top_k, "nflip": job.nflip,
                   "min_quality": int(pcfg["min_quality"])},
        "files": [{k: f[k] for k in ("file", "sha256", "rows")} for f in files],
        "errors_file": {"file": "errors/part-00000.parquet", "sha256": fsio.sha256_bytes(err_data)},
        "counts": counts,
        "timings": {"match_s": round(t_match, 3), "total_s": round(time.monotonic() - t0, 3)},
    }, engine=engine, cfg=cfg)
