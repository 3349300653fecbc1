"""The int64 ids of the index and where each gallery image's data lives.

An id is ``(file_no << 32) | row``: ``file_no`` indexes the index manifest's ``feature_files``
list (every gallery feature shard ever added, in order), ``row`` is the row inside that Parquet
file. So the id itself says where the 512-d fine vector, the ``image_id`` and the ``uri`` are:
fetching a shortlist reads only the row groups that hold it, grouped by file, never the whole
gallery. Scales to 2^31 feature files x 2^32 rows each; the mapping costs no storage beyond the
feature shards themselves (which are kept anyway for the rerank).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import pyarrow as pa

from retrieval import fsio

ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1


def encode_ids(file_no: int | np.ndarray, rows: np.ndarray) -> np.ndarray:
    return (np.asarray(file_no, dtype=np.int64) << ROW_BITS) | np.asarray(rows, dtype=np.int64)


def decode_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64)
    return ids >> ROW_BITS, ids & ROW_MASK


def fetch_rows(feature_files: Sequence[str], ids: np.ndarray, columns: Sequence[str]) -> pa.Table:
    """Rows for ``ids`` (in the order given; duplicates allowed), reading from each feature
    file only the row groups that contain requested rows. ``feature_files[file_no]`` is a URL."""
    ids = np.asarray(ids, dtype=np.int64)
    files, rows = decode_ids(ids)
    out_parts: list[pa.Table] = []
    order_parts: list[np.ndarray] = []
    positions = defaultdict(list)
    for pos, f in enumerate(files.tolist()):
        positions[f].append(pos)
    for f, pos_list in positions.items():
        if f < 0 or f >= len(feature_files):
            raise KeyError(f"id refers to feature file #{f}, the index has {len(feature_files)}")
        pos = np.asarray(pos_list)
        want = rows[pos]
        pf = fsio.parquet_file(feature_files[f])
        md = pf.metadata
        starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        if want.size and want.max() >= starts[-1]:
            raise KeyError(f"row {int(want.max())} beyond the {starts[-1]} rows of {feature_files[f]}")
        groups = np.searchsorted(starts, want, side="right") - 1
        needed = np.unique(groups)
        table = pf.read_row_groups(needed.tolist(), columns=list(columns))
        # offset of each needed group inside `table`
        sizes = starts[needed + 1] - starts[needed]
        base = dict(zip(needed.tolist(), np.cumsum(np.r_[0, sizes[:-1]]).tolist()))
        local = np.array([base[g] for g in groups.tolist()], dtype=np.int64) + (want - starts[groups])
        out_parts.append(table.take(pa.array(local)))
        order_parts.append(pos)
    if not out_parts:
        return pa.table({c: [] for c in columns})
    table = pa.concat_tables(out_parts)
    inverse = np.empty(len(ids), dtype=np.int64)
    inverse[np.concatenate(order_parts)] = np.arange(len(ids))
    return table.take(pa.array(inverse))
