"""``retrieval index --compact --output URL``: drop an index's removed rows physically.

After ``retrieval remove`` the removed rows are tombstones: still in the shards and in the feature
files, left out of every search. Compaction (on the engine, under the index's lease):

1. each feature file holding rows of listed ids (tombstones, and rows a build left out) is
   rewritten without them, as a copy inside the index
   (``features/part-NNNNN-cK.parquet``; the index reads its rows from there from now on: the
   extraction output it came from is not changed, and its takedown list keeps those ids out of
   any later build);
2. each shard whose slice touches such a file is rebuilt from the new files with the index's own
   trained quantizer (``compact-K/shard-NNNNN.index``), its duplicates and listed ids left out
   as the build does; the other shards are kept as they are;
3. the manifest (feature files, shards, counts, the ``takedowns`` batch, no tombstones) is
   committed last; then the files it no longer names are deleted (earlier shard files and
   compacted copies, the tombstones): a search started before the commit may then fail on a
   missing file and is rerun.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from retrieval import fsio, outputs
from retrieval.config import Config
from retrieval.engine import Engine, as_engine
from retrieval.index import dedup, finecopy, idmap, takedowns as td
from retrieval.index.reader import FeatureFile
from retrieval.index.shard import ShardJob, ShardResult, SliceSpec, shard_file, shard_task
from retrieval.index.store import TRAINED, read_index_manifest

log = logging.getLogger(__name__)


def _compact_file(index_url: str, storage_options: dict | None, task: tuple[dict, np.ndarray, str]) -> dict:
    """A task: one feature file without the rows ``drop``, written to ``name`` in the index."""
    fsio.configure(storage_options)
    entry, drop, name = task
    pf = fsio.parquet_file(entry["url"])
    group = pf.metadata.row_group(0).num_rows if pf.metadata.num_row_groups else 1024
    table = pf.read()
    keep = np.ones(table.num_rows, bool)
    keep[drop] = False
    url = fsio.join(index_url, name)
    with fsio.atomic_open(url, "wb") as fh:
        pq.write_table(table.filter(keep), fh, row_group_size=max(1, group), compression="zstd")
    return {**entry, "url": url, "sha256": fsio.sha256_file(url), "rows": int(keep.sum()),
            "compacted_from": entry.get("compacted_from", entry["url"])}


def _duplicates(engine: Engine, m: dict, files: list[FeatureFile], storage_options: dict | None) -> dedup.Duplicates:
    if m.get("skipped", {}).get("duplicate_rule", "skip") != "skip":
        return dedup.Duplicates()
    if sum(f.rows for f in files) <= int(m["config"]["index"].get("dedup_on_driver_max", 20_000_000)):
        hashes = dict(zip([f.file_no for f in files], engine.map(dedup.file_hashes, files, "compact ids")))
        return dedup.find_from_hashes(files, hashes, 0)
    return dedup.find(engine, files, 0, storage_options)


def _slices(m: dict, files: list[FeatureFile], dropped: dict[int, np.ndarray], skip: dedup.Duplicates
            ) -> list[SliceSpec]:
    """The shards touching a compacted file, their segments renumbered to the rows kept."""
    out = []
    for no, entry in enumerate(m["shards"]):
        segs = entry.get("segments", [])
        if not any(f in dropped for f, _, _ in segs):
            continue
        new, skips, h = [], [], hashlib.sha256(f"compact:{entry['sha256']}".encode())
        for f, s, e in segs:
            d = dropped.get(f, np.zeros(0, np.int64))
            s, e = s - int(np.searchsorted(d, s)), e - int(np.searchsorted(d, e))
            new.append((f, files[f].url, s, e))
            rows = skip.rows_in(f, s, e)
            if len(rows):
                skips.append((f, rows))
            h.update(f"{f}:{s}:{e}:{len(rows)}".encode())
        out.append(SliceSpec(shard=no, segments=tuple(new), skip=tuple(skips), fingerprint=h.hexdigest()[:32]))
    return out


def _rebuild(run: dict, m: dict, slices: list[SliceSpec], n: int, engine: Engine) -> list[dict]:
    trained = fsio.read_bytes(fsio.join(run["index"], TRAINED))
    if fsio.sha256_bytes(trained) != m["trained"]["sha256"]:
        raise ValueError(f"{fsio.join(run['index'], TRAINED)} does not match the sha256 in the index manifest")
    job = ShardJob(output=fsio.join(run["index"], f"compact-{n:03d}"), trained_sha256=m["trained"]["sha256"],
                   batch_rows=int(run["cfg"]["index.batch_rows"]), threads=run["cfg"]["index.threads"],
                   queries=np.zeros((0, int(m["dim"])), np.float32), source_ids=np.zeros(0, np.int64), k=1,
                   grid=(), storage_options=run["so"], fine_by_list=finecopy.all_copies(m) is not None)
    ref = engine.broadcast(trained)
    try:
        result: ShardResult = engine.map_reduce(functools.partial(shard_task, job, ref), slices, ShardResult.merge,
                                                "compact shards")
    finally:
        ref.destroy()
    return [{**{k: s[k] for k in ("shard", "sha256", "ntotal", "bytes", "segments")},
             "file": f"compact-{n:03d}/{shard_file(s['shard'])}",
             **({"fine_by_list": {**s["fine_by_list"], "file": f"compact-{n:03d}/{s['fine_by_list']['file']}"}}
                if s.get("fine_by_list") else {})} for s in result.stats]


def _own_files(index_url: str, man: dict) -> set[str]:
    """The files inside the index a manifest names besides the fixed ones: shards, their markers,
    compacted feature copies (paths relative to the index)."""
    out = set()
    for s in man["shards"]:
        d, _, base = s["file"].rpartition("/")
        out |= {s["file"], f"{d + '/' if d else ''}_shards/{base.replace('.index', '.json')}"}
        if s.get("fine_by_list"):
            out.add(s["fine_by_list"]["file"])
    prefix = fsio.join(index_url, "features") + "/"
    return out | {"features/" + f["url"][len(prefix):] for f in man["feature_files"] if f["url"].startswith(prefix)}


@outputs.leased
def compact(index_url: str, cfg: Config, engine: Engine | Any = None) -> dict:
    """Drop the index's tombstoned rows from its shards and feature rows (see the module doc);
    returns the manifest (unchanged when there is nothing to compact)."""
    t0 = time.monotonic()
    engine, so = as_engine(engine), cfg["io.storage_options"]
    outputs.configure_and_check_writable(index_url, so)
    outputs.claim_existing(index_url, "index", "index --compact", cfg)
    m = read_index_manifest(index_url)
    block, listed = m.get("takedowns") or {}, td.read_list(index_url).column("image_id").to_pylist()
    tomb = td.find_rows(engine, [(int(f["file_no"]), f["url"]) for f in m["feature_files"]], listed, so,
                        "compact rows")           # tombstones, and listed rows a build left out
    if tomb.num_rows == 0:
        log.info("%s: no removed rows to compact", index_url)
        return m
    n = 1 + sum(1 for b in block.get("batches", []) if b.get("kind") == "compact")
    f_of, rows = idmap.decode_ids(tomb.column("id").to_numpy())
    dropped = {int(f): np.unique(rows[f_of == f]) for f in np.unique(f_of).tolist()}
    tasks = [(m["feature_files"][f], d, f"features/part-{f:05d}-c{n}.parquet") for f, d in dropped.items()]
    new_entries = engine.map(functools.partial(_compact_file, index_url, so), tasks, "compact files")
    entries = list(m["feature_files"])
    for e in new_entries:
        entries[int(e["file_no"])] = e
    files = [FeatureFile.from_dict({**e, "output": e.get("output", "")}) for e in entries]
    skip = _duplicates(engine, m, files, so)
    rebuilt = _rebuild({"index": index_url, "cfg": cfg, "so": so}, m, _slices(m, files, dropped, skip), n, engine)
    shards = list(m["shards"])
    for s in rebuilt:
        shards[s["shard"]] = s
    ntotal = sum(int(s["ntotal"]) for s in shards)
    info = {"batch": 1 + max([int(b["batch"]) for b in block.get("batches", [])], default=0), "kind": "compact",
            "at": td.now(), "rows_dropped": tomb.num_rows,
            "tombstones_dropped": int(block.get("tombstoned_rows", 0)), "files": len(new_entries), "shards": len(rebuilt),
            "vectors_before": int(m["ntotal"]), "vectors_after": ntotal, "engine": engine.name,
            "seconds": round(time.monotonic() - t0, 3)}
    disk = sum(int(s["bytes"]) for s in shards) + int(m["trained"]["bytes"])
    new = {**m, "feature_files": entries, "shards": shards, "ntotal": ntotal, "live": ntotal,
           "bytes_on_disk": disk, "bytes_per_vector": round(disk / max(ntotal, 1), 2),
           "takedowns": {**block, "tombstones": None, "tombstoned_rows": 0,
                         "compacted_rows": int(block.get("compacted_rows", 0)) + tomb.num_rows,
                         "removed_ids": len(listed),
                         "batches": [*block.get("batches", []), info]}}
    if new.pop("merged", None) is not None:
        log.warning("%s: the merged on-disk index is dropped (it held removed rows): rebuild it", index_url)
        from retrieval.index.layout import MERGED_DATA, MERGED_INDEX, remove
        remove(index_url, [MERGED_INDEX, MERGED_DATA])
    new = outputs.commit(index_url, "index", new)
    from retrieval.index.layout import remove
    remove(index_url, sorted(_own_files(index_url, m) - _own_files(index_url, new)))
    td.clean_tombstones(index_url, set())
    log.info("compact %s: %d removed rows dropped, %d feature files rewritten, %d shards rebuilt, %.1fs",
             index_url, tomb.num_rows, len(new_entries), len(rebuilt), info["seconds"])
    return new
