"""The gallery's takedown list and an index's tombstones (``retrieval remove``, docs/lifecycle.md).

In the index directory::

    _takedowns/list.parquet              the takedown list (image_id, removed_at, batch): every id
                                         removed and not restored, found in the gallery or not
    _takedowns/tombstones-NNNNN.parquet  the index ids (``file_no << 32 | row``) of removed rows
                                         still in the shards (+ image_id, shard); NNNNN = the batch

The manifest's ``takedowns`` block names both with their sha256 and records every batch (remove,
restore, compact: when, how many). The list is part of the gallery's state, not a filter of
today's rows: every build into the directory (new, ``index.mode=overwrite``, ``--append``) leaves
the rows of listed ids out of its shards, so a re-extracted or re-indexed image stays removed until
``retrieval remove --restore``. Tombstones filter every search from the moment the manifest that
names them is committed (:func:`drop_removed`, applied to each shard's list before the merge) until
``retrieval index --compact`` drops the rows physically.
"""
from __future__ import annotations

import functools
import io
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval import fsio
from retrieval.index import idmap
from retrieval.index.dedup import Duplicates

DIR = "_takedowns"
LIST = f"{DIR}/list.parquet"
LIST_SCHEMA = pa.schema([("image_id", pa.string()), ("removed_at", pa.string()), ("batch", pa.int32())])
TOMB_SCHEMA = pa.schema([("id", pa.int64()), ("image_id", pa.string()), ("shard", pa.int32())])


class IdsInputError(ValueError):
    """A takedown id file that cannot be read (the message names it)."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------
# the ids a user hands in
def read_ids(url: str) -> list[str]:
    """The image ids of ``url``, in order, each once: a text file (one id a line; blank lines
    skipped), a CSV with an ``image_id`` column, or a Parquet file or folder with one."""
    if not fsio.exists(url):
        raise IdsInputError(f"--ids {url}: no such file")
    lower = url.rstrip("/").lower()
    fs, path = fsio.url_to_fs(url)
    try:
        if lower.endswith((".parquet", ".pq")) or fs.isdir(path):
            table = fsio.read_parquet(url)
            ids = _column(table, url)
        elif lower.endswith(".csv"):
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(io.BytesIO(fsio.read_bytes(url)),
                                  convert_options=pcsv.ConvertOptions(column_types={"image_id": pa.string()}))
            ids = _column(table, url)
        else:
            ids = fsio.read_bytes(url).decode("utf-8-sig").splitlines()     # a BOM is no part of the first id
    except IdsInputError:
        raise
    except Exception as exc:
        raise IdsInputError(f"--ids {url}: not readable as a text, CSV or Parquet id list: {exc}") from None
    return list(dict.fromkeys(s.strip() for s in ids if s is not None and s.strip()))


def _column(table: pa.Table, url: str) -> list:
    if "image_id" not in table.column_names:
        raise IdsInputError(f"--ids {url}: no image_id column (columns: {', '.join(table.column_names)})")
    return table.column("image_id").cast(pa.string()).to_pylist()


# ---------------------------------------------------------------------------------------------
# the list and the tombstones
def read_list(index_url: str) -> pa.Table:
    """The takedown list of the index directory (empty when there is none)."""
    url = fsio.join(index_url, LIST)
    if not fsio.exists(url):
        return LIST_SCHEMA.empty_table()
    return fsio.read_parquet(url).select(LIST_SCHEMA.names).cast(LIST_SCHEMA)


def _write(url: str, table: pa.Table) -> dict:
    import pyarrow.parquet as pq

    with fsio.atomic_open(url, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
    return {"sha256": fsio.sha256_file(url), "rows": table.num_rows}


def write_list(index_url: str, table: pa.Table) -> dict:
    return {"file": LIST, **_write(fsio.join(index_url, LIST), table.cast(LIST_SCHEMA))}


def write_tombstones(index_url: str, table: pa.Table, batch: int) -> dict | None:
    """The tombstone file of ``batch`` (None when there are none)."""
    if table.num_rows == 0:
        return None
    name = f"{DIR}/tombstones-{batch:05d}.parquet"
    table = table.cast(TOMB_SCHEMA).sort_by("id")
    return {"file": name, **_write(fsio.join(index_url, name), table)}


def read_tombstones(index_url: str, manifest: dict, verify: bool = True) -> pa.Table:
    entry = (manifest.get("takedowns") or {}).get("tombstones")
    if not entry:
        return TOMB_SCHEMA.empty_table()
    url = fsio.join(index_url, fsio.safe_relpath(entry["file"]))
    from retrieval.index.store import IndexIntegrityError

    if not fsio.exists(url):
        raise IndexIntegrityError(f"tombstone file {url} is missing")
    if verify and fsio.sha256_file(url) != entry["sha256"]:
        raise IndexIntegrityError(f"tombstone file {url} does not match the sha256 in the index manifest")
    return fsio.read_parquet(url).cast(TOMB_SCHEMA)


@dataclass(frozen=True)
class Removed:
    """What a search leaves out: the sorted removed ids and their count in each shard."""
    ids: np.ndarray
    per_shard: tuple[int, ...]

    def in_shard(self, shard_no: int) -> int:
        return self.per_shard[shard_no] if shard_no < len(self.per_shard) else 0


def removed(index_url: str, manifest: dict, verify: bool = True) -> Removed | None:
    """The index's tombstones for a search (None when there are none)."""
    t = read_tombstones(index_url, manifest, verify)
    if t.num_rows == 0:
        return None
    ids = np.sort(t.column("id").to_numpy())
    shards = t.column("shard").to_numpy()
    counts = np.bincount(shards[shards >= 0], minlength=len(manifest["shards"]))
    return Removed(ids, tuple(int(c) for c in counts))


def drop_removed(scores: np.ndarray, ids: np.ndarray, removed_ids: np.ndarray | None) -> int:
    """Mark removed ids empty (id -1, score -inf) in place; returns how many were dropped."""
    if removed_ids is None or not len(removed_ids) or not ids.size:
        return 0
    pos = np.searchsorted(removed_ids, ids).clip(0, len(removed_ids) - 1)
    hit = (removed_ids[pos] == ids) & (ids >= 0)
    ids[hit] = -1
    scores[hit] = -np.inf
    return int(hit.sum())


def shard_of(manifest: dict, gids: np.ndarray) -> np.ndarray:
    """The shard holding each gallery id (-1: none: the row lies in no shard's segments)."""
    files, rows = idmap.decode_ids(gids)
    out = np.full(len(gids), -1, np.int32)
    for shard_no, entry in enumerate(manifest["shards"]):
        for f, s, e in entry.get("segments", []):
            out[(files == f) & (rows >= s) & (rows < e)] = shard_no
    return out


# ---------------------------------------------------------------------------------------------
# finding the rows of ids in feature files (one task per file)
def _match_file(wanted: Any, storage_options: dict | None, f: tuple[int, str]) -> pa.Table:
    fsio.configure(storage_options)
    file_no, url = f
    col = fsio.read_parquet(url, columns=["image_id"]).column(0).cast(pa.string())
    value_set = wanted.value if hasattr(wanted, "value") else wanted
    rows = np.flatnonzero(pc.is_in(col, value_set=value_set).to_numpy(zero_copy_only=False))
    return pa.table({"id": pa.array(idmap.encode_ids(file_no, rows)),
                     "image_id": col.combine_chunks().take(pa.array(rows))}, schema=TOMB_SCHEMA.remove(2))


def find_rows(engine: Any, files: Sequence[tuple[int, str]], ids: Sequence[str],
              storage_options: dict | None, label: str = "takedown rows") -> pa.Table:
    """``(id, image_id)`` of every row of ``files`` ((file_no, url)) whose image_id is in ``ids``."""
    empty = TOMB_SCHEMA.remove(2).empty_table()
    if not ids or not files:
        return empty
    ref = engine.broadcast(pa.array(list(ids), pa.string()))
    try:
        parts = engine.map(functools.partial(_match_file, ref, storage_options), list(files), label)
    finally:
        ref.destroy()
    return pa.concat_tables([empty, *parts]).sort_by("id")


def skip_rows(found: pa.Table) -> dict[int, np.ndarray]:
    """file_no -> sorted rows, the shape a build's skip set takes (:class:`~retrieval.index.dedup.Duplicates`)."""
    files, rows = idmap.decode_ids(found.column("id").to_numpy())
    return {int(f): np.sort(rows[files == f]) for f in np.unique(files).tolist()}


def clean_tombstones(index_url: str, keep: set[str]) -> None:
    """Remove the tombstone files not in ``keep`` (those no manifest names any more)."""
    fs, root = fsio.url_to_fs(fsio.join(index_url, DIR))
    if not fs.exists(root):
        return
    for p in fs.ls(root, detail=False):
        name = f"{DIR}/{p.rstrip('/').rsplit('/', 1)[-1]}"
        if name.startswith(f"{DIR}/tombstones-") and name not in keep:
            fs.rm(p)


# ---------------------------------------------------------------------------------------------
# a build into the directory: the list applied, the block carried
def apply_list(engine: Any, output_url: str, files: Sequence[Any], skip: Duplicates,
               storage_options: dict | None) -> tuple[Duplicates, int]:
    """The build's skip set with the rows of listed ids in ``files`` (FeatureFiles) added, and
    how many rows that adds (rows already skipped as duplicates are not counted twice)."""
    listed = read_list(output_url)
    if not listed.num_rows:
        return skip, 0
    rows = skip_rows(find_rows(engine, [(f.file_no, f.url) for f in files], listed.column("image_id").to_pylist(),
                               storage_options, "index takedowns"))
    none = np.zeros(0, np.int64)
    merged = {f: np.union1d(skip.skip.get(f, none), rows.get(f, none)).astype(np.int64)
              for f in set(skip.skip) | set(rows)}
    added = sum(len(np.setdiff1d(r, skip.skip.get(f, none))) for f, r in rows.items())
    return Duplicates(skip=merged, count=skip.count, examples=skip.examples), int(added)


def carry_into(manifest: dict, output_url: str, old: dict | None) -> None:
    """A build's manifest gets the directory's takedowns: an append keeps the old block (the old
    rows' tombstones stay), a new build names the list (no tombstones: it left the rows out)."""
    block = (old or {}).get("takedowns")
    if block is None:
        clean_tombstones(output_url, set())
        listed = read_list(output_url)
        if listed.num_rows:
            url = fsio.join(output_url, LIST)
            block = {"list": {"file": LIST, "sha256": fsio.sha256_file(url), "rows": listed.num_rows},
                     "tombstones": None, "removed_ids": listed.num_rows, "tombstoned_rows": 0, "batches": []}
    if block is not None:
        manifest["takedowns"] = block
    manifest["live"] = int(manifest["ntotal"]) - live_tombstones(output_url, manifest)


def live_tombstones(index_url: str, manifest: dict) -> int:
    """Tombstones of rows inside shards (what ``live`` subtracts from ``ntotal``)."""
    t = read_tombstones(index_url, manifest, verify=False)
    return int((t.column("shard").to_numpy() >= 0).sum()) if t.num_rows else 0
