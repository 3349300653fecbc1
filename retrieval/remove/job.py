"""``retrieval remove --index URL --ids URL``: take gallery images down from an index, at once.

The ids' rows are found in the index's feature files (one task per file), recorded as tombstones
(:mod:`retrieval.index.takedowns`) and added to the gallery's takedown list; the index manifest,
which names both, is committed last, under the index's lease: from that moment every search
leaves them out, and every later build into the index directory leaves their rows out.
``restore=True`` lifts takedowns (their rows come back at once where they are still in the
shards; compacted rows come back with the next ``--append`` of features holding them).
Ids found nowhere are counted (``unknown``) and still listed, so a later append of them stays out.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval import outputs
from retrieval.config import Config
from retrieval.engine import Engine, as_engine
from retrieval.index import takedowns as td
from retrieval.index.store import read_index_manifest

log = logging.getLogger(__name__)


def _files(manifest: dict) -> list[tuple[int, str]]:
    return [(int(f["file_no"]), f["url"]) for f in manifest["feature_files"]]


def _take_down(index_url: str, manifest: dict, ids: list[str], listed: pa.Table, old_tomb: pa.Table,
               batch: int, at: str, engine: Engine, storage_options: dict | None) -> tuple[pa.Table, pa.Table, dict]:
    """The new list and tombstones, and the batch's counts. The rows of ids already listed are
    looked up too: those still in a shard without a tombstone (a run that wrote the list and stopped
    before its commit) get one now."""
    known = set(listed.column("image_id").to_pylist())
    new = [i for i in ids if i not in known]
    found = td.find_rows(engine, _files(manifest), ids, storage_options)
    found = found.filter(pc.invert(pc.is_in(found.column("id"), value_set=old_tomb.column("id").combine_chunks())))
    shards = td.shard_of(manifest, found.column("id").to_numpy())
    keep = pc.or_(pc.is_in(found.column("image_id"), value_set=pa.array(new, pa.string())),
                  pa.array(shards >= 0))
    found, shards = found.filter(keep), shards[keep.to_numpy(zero_copy_only=False)]
    tomb = pa.concat_tables([old_tomb, found.append_column("shard", pa.array(shards, pa.int32()))
                             .cast(td.TOMB_SCHEMA)])
    found_ids = set(found.column("image_id").to_pylist()) & set(new)
    added = pa.table({"image_id": pa.array(new, pa.string()), "removed_at": pa.array([at] * len(new), pa.string()),
                      "batch": pa.array(np.full(len(new), batch, np.int32))}, schema=td.LIST_SCHEMA)
    counts = {"requested": len(ids), "removed_ids": len(new), "already_removed": len(ids) - len(new),
              "found": len(found_ids), "unknown": len(set(new) - found_ids), "rows": found.num_rows,
              "rows_in_shards": int((shards >= 0).sum())}
    return pa.concat_tables([listed, added]), tomb, counts


def _restore(ids: list[str], listed: pa.Table, old_tomb: pa.Table) -> tuple[pa.Table, pa.Table, dict]:
    wanted = pa.array(ids, pa.string())
    keep_list = pc.invert(pc.is_in(listed.column("image_id"), value_set=wanted))
    keep_tomb = pc.invert(pc.is_in(old_tomb.column("image_id"), value_set=wanted))
    restored = listed.num_rows - int(pc.sum(keep_list).as_py() or 0)
    counts = {"requested": len(ids), "restored_ids": restored, "not_removed": len(ids) - restored,
              "rows": old_tomb.num_rows - int(pc.sum(keep_tomb).as_py() or 0)}
    return listed.filter(keep_list), old_tomb.filter(keep_tomb), counts


def record(index_url: str, manifest: dict, listed: pa.Table, tomb: pa.Table, batch_info: dict) -> dict:
    """The manifest with the new list, tombstones and batch (tombstone files no manifest names removed
    after the commit by the caller)."""
    block = dict(manifest.get("takedowns") or {})
    block["list"] = td.write_list(index_url, listed)
    block["tombstones"] = td.write_tombstones(index_url, tomb, batch_info["batch"])
    block["removed_ids"] = listed.num_rows
    block["tombstoned_rows"] = tomb.num_rows
    block["batches"] = list(block.get("batches", [])) + [batch_info]
    return {**manifest, "takedowns": block,
            "live": int(manifest["ntotal"]) - int((tomb.column("shard").to_numpy() >= 0).sum())}


@outputs.leased
def remove(index_url: str, ids_url: str, cfg: Config, engine: Engine | Any = None, restore: bool = False) -> dict:
    """Take the images of ``ids_url`` (:func:`~retrieval.index.takedowns.read_ids`) down from the
    index at ``index_url`` (or, ``restore``, lift their takedown); returns the index manifest."""
    t0 = time.monotonic()
    engine = as_engine(engine)
    storage_options = cfg["io.storage_options"]
    outputs.configure_and_check_writable(index_url, storage_options)
    ids = td.read_ids(ids_url)
    outputs.claim_existing(index_url, "index", "remove", cfg)
    manifest = read_index_manifest(index_url)
    listed, old_tomb = td.read_list(index_url), td.read_tombstones(index_url, manifest)
    at = td.now()
    batch = 1 + max([int(b["batch"]) for b in (manifest.get("takedowns") or {}).get("batches", [])], default=0)
    if restore:
        listed, tomb, counts = _restore(ids, listed, old_tomb)
    else:
        listed, tomb, counts = _take_down(index_url, manifest, ids, listed, old_tomb, batch, at, engine,
                                          storage_options)
    info = {"batch": batch, "kind": "restore" if restore else "remove", "ids": ids_url, "at": at, **counts,
            "engine": engine.name, "seconds": round(time.monotonic() - t0, 3)}
    new = outputs.commit(index_url, "index", record(index_url, manifest, listed, tomb, info))
    # the previous manifest's file stays (a search that has just read that manifest still reads it)
    td.clean_tombstones(index_url, {((m.get("takedowns") or {}).get("tombstones") or {}).get("file", "")
                                    for m in (manifest, new)})
    log.info("%s %s: %s", "restore" if restore else "remove", index_url,
             ", ".join(f"{k} {v}" for k, v in counts.items()))
    return new
