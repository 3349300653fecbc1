"""Fine vectors (and labels) of gallery rows, read by Parquet row group and kept per process.

The rerank of one query chunk needs the 512-d vectors of its shortlist rows. They are located the
way :mod:`retrieval.index.idmap` defines (file, row -> row group); only the row groups holding
wanted rows are read. Each group is decoded once per process, straight into a per-file array with
one row per row of the file (``num_rows x D``, allocated when the file is first touched: pages of
groups never read are never written, so they take no memory), and stays there while the cache
fits in its budget. The rerank's kernel then reads candidate rows from that array by their row
number: no per-chunk gather copy of the candidates. The next chunk that touches the same group
(on the same executor, or in the local engine) does not read or decode it again, which at the
default shortlist is almost every group.

The budget counts the bytes of decoded groups; when it is exceeded, the least recently used FILES
are dropped (whole: their arrays are freed), never the one being read.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np
import pyarrow as pa

from retrieval import fsio
from retrieval.index import idmap
from retrieval.schema import column_matrix


class _Footer:
    def __init__(self, url: str) -> None:
        pf = fsio.parquet_file(url)     # pyarrow's own I/O (see fsio.arrow_fs)
        md = pf.metadata
        self.num_rows = md.num_rows
        self.starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self.has_scale = "fine_scale" in pf.schema_arrow.names
        fine = [j for j in range(md.num_columns)
                if md.schema.column(j).path.split(".")[0] in ("fine", "fine_scale")]
        # bytes of the fine column (and its scales) per row group: as stored (what a read moves)
        # and decoded (what the rerank holds)
        labels = [j for j in range(md.num_columns) if md.schema.column(j).path in ("image_id", "uri")]
        self.stored, self.label_stored = (
            np.array([sum(md.row_group(i).column(j).total_compressed_size for j in cols)
                      for i in range(md.num_row_groups)], np.int64) for cols in (fine, labels))
        self.row_bytes = _decoded_row_bytes(pf.schema_arrow.field("fine").type, self.has_scale) \
            if "fine" in pf.schema_arrow.names else 0

    def groups_of(self, rows: np.ndarray, url: str) -> np.ndarray:
        """The distinct row groups (sorted) holding ``rows`` (any order, repeats allowed)."""
        if len(rows) == 0:
            return np.zeros(0, np.int64)
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= self.num_rows:
            raise KeyError(f"row {hi if hi >= self.num_rows else lo} beyond the {self.num_rows} rows of {url}")
        seen = np.zeros(self.num_rows, dtype=bool)      # O(rows + file): no search per row
        seen[rows] = True
        starts, stops = self.starts[:-1], self.starts[1:]
        hit = np.logical_or.reduceat(seen, np.minimum(starts, self.num_rows - 1)) & (stops > starts)
        return np.flatnonzero(hit)


def _decoded_row_bytes(fine_type: pa.DataType, has_scale: bool) -> int:
    """Bytes one decoded row of the fine column takes (int8 codes or float32, + a float32 scale)."""
    if pa.types.is_fixed_size_binary(fine_type):
        width = fine_type.byte_width
    elif pa.types.is_fixed_size_list(fine_type):
        width = fine_type.list_size * fine_type.value_type.bit_width // 8
    else:           # variable lists (e.g. written by Spark): 512 float32, the model's fine width
        width = 512 * 4
    return width + (4 if has_scale else 0)


def read_groups_into(url: str, ft: _Footer, groups: list[int], targets, base: int, threads: int) -> int:
    """Decode the fine vectors (+ scales) of row ``groups`` of ``url`` into the arrays
    ``targets(dtype, dim)`` returns, ``(codes, scales or None)`` (called once the codes' type is
    known, so the targets can be allocated lazily): rows ``[a, b)`` of the file go to rows
    ``[a - base, b - base)``. In ``threads`` parallel parts (pyarrow decodes without the GIL);
    returns the decoded bytes."""
    cols = ["fine", "fine_scale"] if ft.has_scale else ["fine"]
    parts = [p.tolist() for p in np.array_split(np.asarray(groups), max(1, min(threads, len(groups)))) if len(p)]

    def read(part: list[int]) -> int:
        table = fsio.parquet_file(url).read_row_groups(part, columns=cols, use_threads=False)
        codes = column_matrix(table.column("fine"))
        scales = table.column("fine_scale").to_numpy() if ft.has_scale else None
        target, target_s = targets(codes.dtype, codes.shape[1])
        pos = 0
        for g in part:
            a, b = int(ft.starts[g]), int(ft.starts[g + 1])
            target[a - base:b - base] = codes[pos:pos + b - a]
            if scales is not None:
                target_s[a - base:b - base] = scales[pos:pos + b - a]
            pos += b - a
        return pos * (codes.itemsize * codes.shape[1] + (4 if scales is not None else 0))

    if len(parts) == 1:
        return read(parts[0])
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(parts)) as pool:
        return sum(pool.map(read, parts))


class _Entry:
    """What the cache holds of one feature file, for one kind of data: which groups are loaded."""

    def __init__(self, ft: _Footer) -> None:
        self.ft = ft
        self.loaded = np.zeros(len(ft.starts) - 1, dtype=bool)
        self.nbytes = 0
        self.lock = threading.Lock()     # one reader fills a file's groups at a time


class _VectorEntry(_Entry):
    codes: np.ndarray | None = None      # num_rows x D (int8 codes or float32), rows of loaded groups valid
    scales: np.ndarray | None = None     # num_rows (int8 storage)


class _LabelEntry(_Entry):
    def __init__(self, ft: _Footer) -> None:
        super().__init__(ft)
        self.groups: dict[int, tuple[pa.Array, pa.Array]] = {}


class VectorCache:
    """Per-process cache of decoded gallery row groups: fine vectors (:meth:`vectors`) and the
    ``image_id``/``uri`` of the result rows (:meth:`labels`), within ``budget_bytes``."""

    def __init__(self, budget_bytes: int = 1 << 30, threads: int = 1) -> None:
        self.budget = budget_bytes
        self.threads = threads          # parallel row-group decoding (set per task)
        self._entries: "OrderedDict[tuple[str, str], _Entry]" = OrderedDict()
        self._footers: dict[str, _Footer] = {}
        self._lock = threading.Lock()
        self.reads = 0          # row groups of fine vectors read from storage (for tests and logs)
        self.label_reads = 0    # row groups of image_id/uri read (labels)
        self.bytes_read = 0     # stored (compressed) bytes of the fine row groups read
        self.bytes_decoded = 0  # their decoded bytes
        self.label_bytes = 0    # stored (compressed) bytes of the image_id/uri row groups read

    def footer(self, url: str, version: str | None = None) -> _Footer:
        key = f"{url}#{version}"
        if key not in self._footers:
            self._footers[key] = _Footer(url)
        return self._footers[key]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def _entry(self, kind: str, url: str, version: str | None, make) -> _Entry:
        """The entry of (kind, file version), created on first use, marked most recently used.
        ``version`` (e.g. the file's sha256 in the index manifest) is part of the key, so a
        replaced file is never served stale."""
        key = (kind, f"{url}#{version}")
        ft = self.footer(url, version)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = make(ft)
            self._entries.move_to_end(key)
            return entry

    def _grew(self, entry: _Entry, added: int) -> None:
        """Account ``added`` bytes to ``entry`` and drop least recently used other files while
        the cache is over its budget."""
        with self._lock:
            entry.nbytes += added
            total = sum(e.nbytes for e in self._entries.values())
            for key in list(self._entries):
                if total <= self.budget:
                    break
                old = self._entries[key]
                if old is entry:
                    continue
                del self._entries[key]
                total -= old.nbytes

    # -- fine vectors ---------------------------------------------------------------------------
    def vectors(self, url: str, rows: np.ndarray, version: str | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(codes, scales)`` of one feature file as whole-file arrays (``num_rows x D`` int8 or
        float32, and ``num_rows`` scales or None): every row group holding one of ``rows`` (any
        order, repeats allowed) is loaded, so ``codes[r]`` is row ``r``'s stored vector for each
        of them (other rows are unspecified)."""
        entry = self._entry("fine", url, version, _VectorEntry)
        ft = entry.ft
        groups = ft.groups_of(np.asarray(rows), url)
        with entry.lock:
            missing = groups[~entry.loaded[groups]]
            if len(missing):
                self._read(url, entry, missing.tolist())
            return entry.codes, entry.scales

    def rows(self, url: str, rows: np.ndarray, version: str | None = None
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored fine codes (``len(rows) x D``) and scales (or None) of the given rows (a copy)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, 0), np.float32), None
        codes, scales = self.vectors(url, rows, version)
        return codes[rows], (scales[rows] if scales is not None else None)

    def _read(self, url: str, entry: _VectorEntry, groups: list[int]) -> None:
        """Decode ``groups`` into the entry's whole-file arrays (allocated on the first group)."""
        ft = entry.ft

        def targets(dtype, dim: int) -> tuple[np.ndarray, np.ndarray | None]:
            with self._lock:
                if entry.codes is None:     # first group of this file: allocate (lazily backed)
                    entry.scales = np.empty(ft.num_rows, np.float32) if ft.has_scale else None
                    entry.codes = np.empty((ft.num_rows, dim), dtype)
            return entry.codes, entry.scales

        added = read_groups_into(url, ft, groups, targets, 0, self.threads)
        entry.loaded[groups] = True
        self.reads += len(groups)
        self.bytes_read += int(ft.stored[groups].sum())
        self.bytes_decoded += added
        self._grew(entry, added)

    # -- labels ---------------------------------------------------------------------------------
    def labels(self, url: str, rows: np.ndarray, version: str | None = None) -> tuple[pa.Array, pa.Array]:
        """``image_id`` and ``uri`` of the given SORTED, distinct rows of one feature file, read by
        row group and kept in the cache (the result rows of every chunk need them, and
        consecutive chunks touch mostly the same groups)."""
        entry = self._entry("labels", url, version, _LabelEntry)
        ft = entry.ft
        rows = np.asarray(rows, dtype=np.int64)
        groups = ft.groups_of(rows, url)
        with entry.lock:
            missing = groups[~entry.loaded[groups]].tolist()
            if missing:
                table = fsio.parquet_file(url).read_row_groups(missing, columns=["image_id", "uri"],
                                                               use_threads=False)
                ids, uris = table.column("image_id").combine_chunks(), table.column("uri").combine_chunks()
                pos = added = 0
                for g in missing:
                    n = int(ft.starts[g + 1] - ft.starts[g])
                    entry.groups[g] = (ids.slice(pos, n), uris.slice(pos, n))
                    added += entry.groups[g][0].nbytes + entry.groups[g][1].nbytes
                    pos += n
                entry.loaded[missing] = True
                self.label_reads += len(missing)
                self.label_bytes += int(ft.label_stored[missing].sum())
                self._grew(entry, added)
            got = {int(g): entry.groups[int(g)] for g in groups}
        where = np.searchsorted(ft.starts, rows, side="right") - 1
        bounds = np.flatnonzero(np.r_[True, where[1:] != where[:-1], True])
        id_parts, uri_parts = [], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            g = int(where[a])
            gid, guri = got[g]
            take = pa.array(rows[a:b] - ft.starts[g])
            id_parts.append(gid.take(take))
            uri_parts.append(guri.take(take))
        if not id_parts:
            return pa.array([], pa.string()), pa.array([], pa.string())
        return pa.concat_arrays(id_parts), pa.concat_arrays(uri_parts)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._footers.clear()


_CACHES: dict[int, VectorCache] = {}


def process_cache(budget_mb: int) -> VectorCache:
    """The per-process cache (one per budget setting)."""
    if budget_mb not in _CACHES:
        _CACHES[budget_mb] = VectorCache(budget_mb << 20)
    return _CACHES[budget_mb]


def labels_by_file(gids: np.ndarray, feature_files: Sequence[str], versions: Sequence[str | None] | None,
                   cache: VectorCache) -> tuple[np.ndarray, pa.Array, pa.Array]:
    """``image_id`` and ``uri`` of gallery ids read file by file through ``cache``'s label row groups
    (each group read once per process): ``(positions in gids, image_id, uri)``, in (file, position)
    order; an id of no feature file is a KeyError."""
    files, rows = idmap.decode_ids(gids)
    order = np.argsort(files, kind="stable")
    bounds = np.flatnonzero(np.r_[True, files[order][1:] != files[order][:-1], True]) if len(gids) else []
    id_parts, uri_parts, pos_parts = [], [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        pos = order[a:b]
        f = int(files[pos[0]])
        if f < 0 or f >= len(feature_files):
            raise KeyError(f"id refers to feature file #{f}, the index has {len(feature_files)}")
        uniq, inverse = np.unique(rows[pos], return_inverse=True)
        ids_f, uris_f = cache.labels(feature_files[f], uniq, versions[f] if versions is not None else None)
        take = pa.array(inverse.astype(np.int64))
        id_parts.append(ids_f.take(take))
        uri_parts.append(uris_f.take(take))
        pos_parts.append(pos)
    if not id_parts:
        return np.zeros(0, np.int64), pa.array([], pa.string()), pa.array([], pa.string())
    return np.concatenate(pos_parts), pa.concat_arrays(id_parts), pa.concat_arrays(uri_parts)


def lookup_labels(gids: np.ndarray, feature_files: Sequence[str], versions: Sequence[str | None] | None,
                  cache: VectorCache) -> tuple[pa.Array, pa.Array]:
    """``image_id`` and ``uri`` of gallery ids, in the order given (:func:`labels_by_file`)."""
    pos, image_id, uri = labels_by_file(gids, feature_files, versions, cache)
    if not len(pos):
        return image_id, uri
    back = np.empty(len(gids), np.int64)
    back[pos] = np.arange(len(gids))
    return image_id.take(pa.array(back)), uri.take(pa.array(back))
