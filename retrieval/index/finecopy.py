"""The gallery's fine column laid out by IVF list (``index.fine_by_list``), one copy file per shard.

The gallery-major rerank (:mod:`retrieval.search.blocks`) reads the gallery's fine vectors once per
run, block by block. When its blocks are runs of feature-file row groups (extraction order), the
shortlist of one query touches nearly every block, so every block task needs nearly every query
vector: blocks x queries x 516 B (2.4 TB for 10M queries at a billion). A candidate, though, always
lies in one of its query's ``nprobe`` probed IVF lists; with the fine column ordered by list and the
blocks cut as ranges of lists, a query's pairs fall in at most ``nprobe`` blocks, and only those
receive its vector (:mod:`retrieval.search.listblocks`).

Each index shard task writes its shard's copy beside the shard, ``shard-NNNNN.fine.parquet``: the
columns ``list`` (int32), ``id`` (the gallery id), ``fine`` and ``fine_scale`` exactly as stored in
the feature files, rows ordered by (list, id), row groups of :data:`ROW_GROUP` rows (the Parquet
statistics of ``list`` say which row groups a range of lists needs). The shard's manifest entry
records it (``fine_by_list``: file, sha256, bytes, rows), so appends (new shards) and compaction
(rebuilt shards) keep it in step with the shards; an index whose shards do not all have one is
searched with the feature-file blocks, as before.
"""
from __future__ import annotations

import base64
import zlib
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import fsio
from retrieval.index import idmap

ROW_GROUP = 1024
PASS_BYTES = 1 << 30      # fine vectors a shard task holds while it writes its copy (one pass)
LIST_SIZES = "retrieval.list_sizes"     # key-value metadata: the rows of each list (int32, zlib, base64)
COLUMNS = ("list", "id", "fine", "fine_scale")


def copy_file(shard: int) -> str:
    return f"shard-{shard:05d}.fine.parquet"


def list_table(ivf) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, lists)`` of every vector of an IVF index, ordered by id (for ``np.searchsorted``);
    only the inverted lists' ids are read (not their codes)."""
    import faiss

    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(lst) for lst in range(ivf.nlist)], np.int64)
    ids = np.empty(int(sizes.sum()), np.int64)
    at = 0
    for lst in np.flatnonzero(sizes).tolist():
        n, ptr = int(sizes[lst]), invlists.get_ids(lst)
        try:
            ids[at:at + n] = faiss.rev_swig_ptr(ptr, n)
        finally:
            invlists.release_ids(lst, ptr)
        at += n
    lists = np.repeat(np.arange(ivf.nlist, dtype=np.int32), sizes)
    o = np.argsort(ids, kind="stable")
    return ids[o], lists[o]


class ListLookup:
    """A shard's id -> IVF list in O(1) per id: an id is ``(file_no << 32) | row`` and a shard holds a
    run of rows of each of its files, so one int32 per row of those runs (holes: rows not in the
    shard) replaces a binary search in the sorted ids. Falls back to the binary search when the runs
    are much sparser than the shard."""

    def __init__(self, table: tuple[np.ndarray, np.ndarray]) -> None:
        self.table = table
        ids, lists = table
        files, rows = idmap.decode_ids(ids)
        starts = np.flatnonzero(np.r_[True, files[1:] != files[:-1]]) if len(ids) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(ids)].astype(np.int64)
        nf = int(files[-1]) + 1 if len(ids) else 0
        self.lo, self.hi = np.zeros(nf, np.int64), np.full(nf, -1, np.int64)      # rows lo..hi per file
        self.lo[files[starts]], self.hi[files[starts]] = rows[starts], rows[ends - 1]
        span = np.maximum(self.hi - self.lo + 1, 0)
        self.offset = np.r_[0, np.cumsum(span)[:-1]].astype(np.int64) if nf else np.zeros(0, np.int64)
        self.dense = None
        if int(span.sum()) <= 2 * len(ids) + 4096:
            self.dense = np.full(int(span.sum()), -2, np.int32)
            self.dense[self.offset[files] + rows - self.lo[files]] = lists

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if self.dense is None:
            return lists_of(self.table, ids)
        flat = ids.reshape(-1)
        out = np.full(flat.shape, -1, np.int32)
        valid = flat >= 0
        if valid.any():
            files, rows = idmap.decode_ids(flat[valid])
            f = np.minimum(files, max(len(self.lo) - 1, 0))
            ok = (files < len(self.lo)) & (rows >= self.lo[f]) & (rows <= self.hi[f]) if len(self.lo) else False
            if not np.all(ok):
                raise KeyError("a shortlist id is not in the shard's inverted lists")
            got = self.dense[self.offset[f] + rows - self.lo[f]]
            if (got < 0).any():
                raise KeyError("a shortlist id is not in the shard's inverted lists")
            out[valid] = got
        return out.reshape(ids.shape)


def lists_of(table: tuple[np.ndarray, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """The list of each id (``-1`` for id -1); an id the table does not hold is an error."""
    sorted_ids, lists = table
    flat = ids.reshape(-1)
    out = np.full(flat.shape, -1, np.int32)
    valid = flat >= 0
    if valid.any():
        pos = np.clip(np.searchsorted(sorted_ids, flat[valid]), 0, max(len(sorted_ids) - 1, 0))
        if not len(sorted_ids) or (sorted_ids[pos] != flat[valid]).any():
            raise KeyError("a shortlist id is not in the shard's inverted lists")
        out[valid] = lists[pos]
    return out.reshape(ids.shape)


def write_copy(output: str, shard: int, ivf, segments: Sequence[tuple], budget: int | None = None) -> dict:
    """The shard's fine vectors ordered by (list, id) into ``output/shard-NNNNN.fine.parquet``
    (``segments``: the slice's ``(file_no, url, start, end)``); its manifest entry. Written in passes
    of whole lists of at most ``budget`` (:data:`PASS_BYTES`) of rows each (each pass reads the row groups of
    the slice that hold its rows), so a task holds one pass, not its whole shard."""
    ids, lists = list_table(ivf)
    order = np.lexsort((ids, lists))
    ids, lists = ids[order], lists[order]
    urls: list[str | None] = [None] * (max([s[0] for s in segments], default=-1) + 1)
    for file_no, url, _, _ in segments:
        urls[file_no] = url
    source = fsio.parquet_file(segments[0][1]).schema_arrow if segments else None
    cols = [c for c in ("fine", "fine_scale") if source is not None and c in source.names] or ["fine"]
    sizes = np.bincount(lists, minlength=int(ivf.nlist)).astype(np.int32)
    schema = pa.schema([("list", pa.int32()), ("id", pa.int64())] + [
        (c, source.field(c).type if source is not None else pa.binary(512)) for c in cols],
        metadata={LIST_SIZES: base64.b64encode(zlib.compress(sizes.tobytes())).decode()})
    url = fsio.join(output, copy_file(shard))
    with fsio.atomic_open(url, "wb") as fh:
        with pq.ParquetWriter(fh, schema, compression={c: "none" if c == "fine" else "zstd" for c in schema.names}) as w:
            for a, b in passes(sizes, 516 if cols == ["fine", "fine_scale"] else 2052, budget):
                rows = idmap.fetch_rows(urls, ids[a:b], cols)
                w.write_table(pa.table({"list": pa.array(lists[a:b], pa.int32()), "id": pa.array(ids[a:b], pa.int64()),
                                        **{c: rows.column(c) for c in cols}}, schema=schema), row_group_size=ROW_GROUP)
    fs, path = fsio.url_to_fs(url)
    return {"file": copy_file(shard), "sha256": fsio.sha256_file(url), "bytes": int(fs.size(path)),
            "rows": int(len(ids))}


def passes(sizes: np.ndarray, row_bytes: int, budget: int | None = None) -> list[tuple[int, int]]:
    """Row ranges ``[a, b)`` of the (list, id)-ordered rows, cut at list boundaries, of at most
    ``budget`` bytes each (:data:`PASS_BYTES`; one list at least)."""
    budget_rows = max(1, (budget or PASS_BYTES) // row_bytes)
    out, start, held = [], 0, 0
    for n in sizes.tolist():
        if held and held + n > budget_rows:
            out.append((start, start + held))
            start, held = start + held, 0
        held += n
    if held:
        out.append((start, start + held))
    return out


def reusable(output: str, entry: dict | None) -> bool:
    """Whether a copy a marker names is still there with its sha256."""
    if not entry:
        return False
    url = fsio.join(output, entry["file"])
    return fsio.exists(url) and fsio.sha256_file(url) == entry.get("sha256")


def all_copies(manifest: dict) -> list[dict] | None:
    """Every shard's ``fine_by_list`` entry, or None when a shard has none (the index predates
    the copy, or was built with ``index.fine_by_list: false``)."""
    entries = [s.get("fine_by_list") for s in manifest.get("shards", [])]
    return entries if entries and all(entries) else None


def list_sizes(metadata: dict | None, nlist: int) -> np.ndarray | None:
    """The rows of each list a copy's key-value metadata records (None when it does not)."""
    raw = (metadata or {}).get(LIST_SIZES.encode())
    if raw is None:
        return None
    sizes = np.frombuffer(zlib.decompress(base64.b64decode(raw)), np.int32).astype(np.int64)
    return sizes if len(sizes) == nlist else None
