"""Duplicate ``image_id``s across the gallery's feature files.

Rule: the FIRST occurrence in (file_no, row) order is the image's row; every later occurrence
is a duplicate. Earlier builds' files have smaller file numbers, so on ``--append`` an image
already in the index keeps its old row and the new copy is the duplicate. With
``index.duplicates`` = ``skip`` (default) duplicates are left out of the index, ``keep`` indexes
them anyway, ``error`` refuses the build; all three count them and report examples.

Three ways to find them, all giving the same answer (tested):

- up to ``index.dedup_on_driver_max`` rows (all files, old and new): the scan tasks return a
  64-bit hash of every ``image_id`` (8 bytes a row); the driver sorts them, and only rows whose hash
  occurs more than once have their real ``image_id`` read back (:func:`find_from_hashes`), so a
  hash collision can never drop an image;
- above that, the engine's :meth:`~retrieval.engine.Engine.find_duplicates` over the ``image_id``
  columns read by the tasks (:func:`find`): on Spark a window over one shuffle by id (only
  duplicated ids reach the driver), locally a pyarrow group-by.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa

from retrieval import fsio
from retrieval.engine import as_engine
from retrieval.index.reader import FeatureFile, FeatureInputError, read_column

ID_SCHEMA = pa.schema([("image_id", pa.string()), ("file_no", pa.int64()), ("row", pa.int64())])
MAX_EXAMPLES = 20


@dataclass
class Duplicates:
    skip: dict[int, np.ndarray] = field(default_factory=dict)  # file_no -> sorted duplicate rows
    count: int = 0          # duplicate rows among the files being added
    examples: list[dict] = field(default_factory=list)

    def rows_in(self, file_no: int, start: int, end: int) -> np.ndarray:
        rows = self.skip.get(file_no)
        if rows is None or not len(rows):
            return np.zeros(0, np.int64)
        return rows[np.searchsorted(rows, start):np.searchsorted(rows, end)]


def _checked_ids(f: FeatureFile) -> pa.Array:
    """The file's ``image_id`` column, with its row count checked against the manifest."""
    try:
        ids = read_column(f.url, "image_id")
    except Exception as exc:
        raise FeatureInputError(f"feature file {f.url}: cannot read its image_id column: {exc}") from exc
    if len(ids) != f.rows:
        raise FeatureInputError(f"feature file {f.url} has {len(ids)} rows, its manifest says {f.rows}")
    return ids


def ids_table(f: FeatureFile) -> pa.Table:
    ids = _checked_ids(f)
    n = len(ids)
    return pa.table({"image_id": ids.cast(pa.string()), "file_no": pa.array(np.full(n, f.file_no, np.int64)),
                     "row": pa.array(np.arange(n, dtype=np.int64))}, schema=ID_SCHEMA)


def hash_ids(ids: pa.Array) -> np.ndarray:
    """Deterministic 64-bit hashes of ``image_id`` strings (the same in every process)."""
    import pandas as pd

    return pd.util.hash_array(ids.to_numpy(zero_copy_only=False), categorize=False).view(np.int64)


def file_hashes(f: FeatureFile) -> np.ndarray:
    return hash_ids(_checked_ids(f))


def find_from_hashes(files: Sequence[FeatureFile], hashes: dict[int, np.ndarray], first_new: int) -> Duplicates:
    """Duplicates from per-file ``image_id`` hashes; candidates are confirmed on the real ids."""
    from retrieval.index import idmap

    files = sorted(files, key=lambda f: f.file_no)
    if not files:
        return Duplicates()
    h = np.concatenate([hashes[f.file_no] for f in files])
    order = np.argsort(h, kind="stable")
    hs = h[order]
    same = hs[1:] == hs[:-1]
    repeated = np.zeros(len(h), bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    pos = np.sort(order[repeated])
    del h, order, hs
    if not len(pos):
        return Duplicates()
    starts = np.cumsum([0] + [f.rows for f in files])
    k = np.searchsorted(starts, pos, side="right") - 1
    file_no = np.array([f.file_no for f in files], np.int64)[k]
    row = pos - starts[k]
    base = files[0].file_no
    urls = {f.file_no - base: f.url for f in files}
    ids = idmap.fetch_rows([urls.get(i, "") for i in range(len(files))],
                           idmap.encode_ids(file_no - base, row), ["image_id"]).column("image_id")
    occ = pa.table({"image_id": ids.cast(pa.string()), "file_no": pa.array(file_no), "row": pa.array(row)},
                   schema=ID_SCHEMA)
    return resolve_duplicates(occ, first_new)


def resolve_duplicates(occurrences: pa.Table, first_new: int) -> Duplicates:
    """From all occurrences of the duplicated ids: which rows of files >= ``first_new`` to skip."""
    out = Duplicates()
    if occurrences.num_rows == 0:
        return out
    t = occurrences.sort_by([("image_id", "ascending"), ("file_no", "ascending"), ("row", "ascending")])
    image_id = t.column("image_id").to_numpy(zero_copy_only=False)
    file_no = t.column("file_no").to_numpy()
    row = t.column("row").to_numpy()
    first = np.ones(len(t), bool)
    first[1:] = image_id[1:] != image_id[:-1]
    dup = ~first & (file_no >= first_new)
    out.count = int(dup.sum())
    for f in np.unique(file_no[dup]).tolist():
        out.skip[int(f)] = np.sort(row[dup & (file_no == f)])
    starts = np.nonzero(first)[0]
    for s, e in zip(starts.tolist(), [*starts[1:].tolist(), len(t)]):
        if len(out.examples) >= MAX_EXAMPLES:
            break
        if dup[s:e].any():
            out.examples.append({"image_id": str(image_id[s]),
                                 "kept": [int(file_no[s]), int(row[s])],
                                 "duplicates": [[int(a), int(b)] for a, b in zip(file_no[s + 1:e], row[s + 1:e])]})
    return out


def _read_ids(storage_options: dict | None, f: FeatureFile) -> pa.Table:
    """A task: one file's ``(image_id, file_no, row)`` table."""
    fsio.configure(storage_options)
    return ids_table(f)


def find(engine, files: Sequence[FeatureFile], first_new: int, storage_options: dict | None = None) -> Duplicates:
    """Every file's ids read by tasks, the occurrences of ids seen more than once found by the
    engine (:meth:`~retrieval.engine.Engine.find_duplicates`) and resolved on the driver."""
    if not files:
        return Duplicates()
    occ = as_engine(engine).find_duplicates(functools.partial(_read_ids, storage_options), list(files),
                                            "image_id", ID_SCHEMA, "index duplicates",
                                            rows=sum(f.rows for f in files))
    return resolve_duplicates(occ, first_new)
