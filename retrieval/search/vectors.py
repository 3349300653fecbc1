"""Fine vectors of gallery rows, read by Parquet row group and kept in a per-process LRU cache.

The rerank of one query chunk needs the 512-d vectors of its shortlist rows. They are located the
way :mod:`retrieval.index.idmap` defines (file, row -> row group); only the row groups holding
wanted rows are read, and each group is decoded once per process and kept (int8 codes + scales as
stored, or float32) while it fits in ``budget_bytes``: the next chunk that touches the same group
(on the same executor, or in the local engine) does not read or decode it again. Decoding row
groups costs time (less since int8 codes are stored as ``fixed_size_binary``), so this matters
whenever chunks share gallery rows, which at S = 500 they mostly do.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from retrieval import fsio
from retrieval.schema import column_matrix


def _size(value: tuple) -> int:
    """Bytes held by a cached group: numpy arrays (codes, scales) or Arrow arrays (labels)."""
    return sum(v.nbytes for v in value if v is not None)


class _Footer:
    def __init__(self, url: str) -> None:
        pf = fsio.parquet_file(url)     # pyarrow's own I/O (see fsio.arrow_fs)
        md = pf.metadata
        self.num_rows = md.num_rows
        self.starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self.has_scale = "fine_scale" in pf.schema_arrow.names


class VectorCache:
    """LRU of decoded row groups: ``(url, group) -> (codes, scales or None)``, and of the groups'
    ``(image_id, uri)`` arrays for the result rows (:meth:`labels`)."""

    def __init__(self, budget_bytes: int = 1 << 30, threads: int = 1) -> None:
        self.budget = budget_bytes
        self.threads = threads          # parallel row-group decoding (set per task)
        self._groups: "OrderedDict[tuple[str, int], tuple[np.ndarray, np.ndarray | None]]" = OrderedDict()
        self._footers: dict[str, _Footer] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.reads = 0          # row groups of fine vectors read from storage (for tests and logs)
        self.label_reads = 0    # row groups of image_id/uri read (labels)

    def footer(self, url: str, version: str | None = None) -> _Footer:
        key = f"{url}#{version}"
        if key not in self._footers:
            self._footers[key] = _Footer(url)
        return self._footers[key]

    def _put(self, key: tuple[str, int], value: tuple) -> None:
        size = _size(value)
        with self._lock:
            if key in self._groups:
                return
            self._groups[key] = value
            self._bytes += size
            while self._bytes > self.budget and len(self._groups) > 1:
                _, old = self._groups.popitem(last=False)
                self._bytes -= _size(old)

    def _get(self, key: tuple[str, int]):
        with self._lock:
            v = self._groups.get(key)
            if v is not None:
                self._groups.move_to_end(key)
            return v

    def rows(self, url: str, rows: np.ndarray, version: str | None = None
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored fine codes (int8 or float32, ``len(rows) x D``) and scales (or None) of the
        given SORTED, distinct rows of one feature file. ``version`` (e.g. the file's sha256 in
        the index manifest) is part of the cache key, so a replaced file is never served stale."""
        ft = self.footer(url, version)
        key = f"{url}#{version}"
        groups, bounds, got = self._groups_of(url, ft, key, rows, self._read)
        codes, scales = [], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            g = int(groups[a])
            c, s = got[g]
            local = rows[a:b] - ft.starts[g]
            codes.append(c[local])
            if s is not None:
                scales.append(s[local])
        if not codes:
            return np.zeros((0, 0), np.float32), None
        return np.concatenate(codes), (np.concatenate(scales) if ft.has_scale else None)

    def _groups_of(self, url: str, ft: _Footer, key: str, rows: np.ndarray, read
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
        """The row group of each of the SORTED ``rows``, the bounds of each group's run of rows,
        and every needed group's cached value (``read(url, key, ft, missing)`` reads and caches the
        others: :meth:`_read` or :meth:`_read_labels`)."""
        if len(rows) and (rows[0] < 0 or rows[-1] >= ft.num_rows):
            raise KeyError(f"row {int(rows[-1])} beyond the {ft.num_rows} rows of {url}")
        groups = np.searchsorted(ft.starts, rows, side="right") - 1
        bounds = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1], True])
        wanted = groups[bounds[:-1]].tolist()
        got = {g: v for g in wanted if (v := self._get((key, g))) is not None}
        missing = [g for g in wanted if g not in got]
        if missing:
            got.update(read(url, key, ft, missing))
        return groups, bounds, got

    def _read_labels(self, url: str, key: str, ft: _Footer, groups: list[int]) -> dict[int, tuple]:
        """Read the ``image_id``/``uri`` columns of ``groups`` and cache each group separately."""
        table = fsio.parquet_file(url).read_row_groups(groups, columns=["image_id", "uri"], use_threads=False)
        ids, uris = table.column("image_id").combine_chunks(), table.column("uri").combine_chunks()
        out, pos = {}, 0
        for g in groups:
            n = int(ft.starts[g + 1] - ft.starts[g])
            out[g] = (ids.slice(pos, n), uris.slice(pos, n))
            self._put((key, g), out[g])
            pos += n
        self.label_reads += len(groups)
        return out

    def _read(self, url: str, key: str, ft: _Footer, groups: list[int]) -> dict[int, tuple]:
        """Read and decode ``groups`` (in ``threads`` parallel parts: pyarrow decodes without the
        GIL, and decoding the list column is the cost) and cache each group separately."""
        cols = ["fine", "fine_scale"] if ft.has_scale else ["fine"]
        parts = [p.tolist() for p in np.array_split(np.asarray(groups), max(1, min(self.threads, len(groups))))
                 if len(p)]

        def read(part: list[int]) -> dict[int, tuple]:
            table = fsio.parquet_file(url).read_row_groups(part, columns=cols, use_threads=False)
            codes = column_matrix(table.column("fine"))
            scales = table.column("fine_scale").to_numpy() if ft.has_scale else None
            out, pos = {}, 0
            for g in part:
                n = int(ft.starts[g + 1] - ft.starts[g])
                value = (codes[pos:pos + n].copy(), scales[pos:pos + n].copy() if scales is not None else None)
                self._put((key, g), value)
                out[g] = value
                pos += n
            return out

        if len(parts) == 1:
            out = read(parts[0])
        else:
            from concurrent.futures import ThreadPoolExecutor

            out = {}
            with ThreadPoolExecutor(len(parts)) as pool:
                for d in pool.map(read, parts):
                    out.update(d)
        self.reads += len(groups)
        return out

    def labels(self, url: str, rows: np.ndarray, version: str | None = None) -> tuple[pa.Array, pa.Array]:
        """``image_id`` and ``uri`` of the given SORTED, distinct rows of one feature file, read by
        row group and kept in the same LRU (the result rows of every chunk need them, and
        consecutive chunks touch mostly the same groups)."""
        ft = self.footer(url, version)
        key = f"{url}#labels#{version}"
        groups, bounds, got = self._groups_of(url, ft, key, rows, self._read_labels)
        id_parts, uri_parts = [], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            g = int(groups[a])
            gid, guri = got[g]
            take = pa.array(rows[a:b] - ft.starts[g])
            id_parts.append(gid.take(take))
            uri_parts.append(guri.take(take))
        if not id_parts:
            return pa.array([], pa.string()), pa.array([], pa.string())
        return pa.concat_arrays(id_parts), pa.concat_arrays(uri_parts)

    def clear(self) -> None:
        with self._lock:
            self._groups.clear()
            self._footers.clear()
            self._bytes = 0


_CACHES: dict[int, VectorCache] = {}


def process_cache(budget_mb: int) -> VectorCache:
    """The per-process cache (one per budget setting)."""
    if budget_mb not in _CACHES:
        _CACHES[budget_mb] = VectorCache(budget_mb << 20)
    return _CACHES[budget_mb]
