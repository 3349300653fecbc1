"""One row per near-duplicate group (``search.collapse_groups``: a duplicates output's URL).

A gallery holding ten copies of one picture answers a query with ten rows of it. With the groups
of ``retrieval duplicates`` a query keeps its best-ranked match of each group (and every match
in no group); the others are dropped and the ranks renumbered 1..n, so a query can get fewer
than ``search.k`` rows. It runs after the search's part files are written
(:func:`collapse_parts`): the gallery ids of each part are joined with the groups by the engine
(:meth:`~retrieval.engine.Engine.map_matched`; on Spark a join, the groups never on the driver),
and a task rewrites each part holding grouped images with its own ``image_id -> group_id`` rows."""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import fsio

log = logging.getLogger(__name__)

LOOKUP_SCHEMA = pa.schema([("image_id", pa.string()), ("group_id", pa.int64())])


def check_groups(url: str, index_url: str, index_manifest: dict) -> None:
    """The duplicates output ``url`` checked against the index (same model; a duplicates output of
    another index is named in a warning)."""
    from retrieval.duplicates.groups import read_manifest

    manifest = read_manifest(url)
    if manifest.get("model_version") != index_manifest.get("model_version"):
        raise ValueError(f"search.collapse_groups {url} grouped a gallery encoded by "
                         f"{manifest.get('model_version')!r}, the index {index_url} by "
                         f"{index_manifest.get('model_version')!r}: run retrieval duplicates on this index")
    if str(manifest.get("index", "")).rstrip("/") != index_url.rstrip("/"):
        log.warning("search.collapse_groups %s grouped the gallery of %s, not of %s: images it does not "
                    "know are not collapsed", url, manifest.get("index"), index_url)


def load_groups(url: str | None, index_url: str, index_manifest: dict) -> dict[str, int] | None:
    """``image_id -> group_id`` of the duplicates output ``url`` (None when off), checked against the
    index (:func:`check_groups`). All of it in memory: for small outputs and tests."""
    if not url:
        return None
    from retrieval.duplicates.groups import read_groups

    check_groups(url, index_url, index_manifest)
    t = read_groups(url, ["image_id", "group_id"])
    return dict(zip(t.column("image_id").to_pylist(), t.column("group_id").to_pylist()))


def collapse_parts(engine, output_url: str, stats: Sequence[dict], url: str,
                   storage_options: dict | None = None, every: float = 10.0) -> list[dict]:
    """The search's part files (``stats``, one per chunk) collapsed by the groups of ``url``: each
    part holding a grouped image rewritten in a task; returns ``stats`` with the rewritten parts'
    ``rows``, ``sha256`` and ``rows_collapsed``. The caller has run :func:`check_groups` before the
    search (the search job does), so it is not read and warned about twice."""
    from retrieval.duplicates.groups import group_files

    parts = [fsio.join(output_url, s["file"]) for s in stats]
    got = engine.map_matched(functools.partial(_rewrite, storage_options), parts,
                             functools.partial(_gallery_ids, storage_options),
                             functools.partial(_lookup, storage_options), group_files(url), LOOKUP_SCHEMA,
                             "search collapse_groups", every)
    out = [dict(s, rows_collapsed=0) for s in stats]
    for i, done in got.items():
        out[i].update(done)
    return out


def _gallery_ids(storage_options: dict | None, part: str) -> pa.Table:
    fsio.configure(storage_options)
    return fsio.parquet_file(part).read(columns=["gallery_id"])


def _lookup(storage_options: dict | None, entry: tuple[str, str | None]) -> pa.Table:
    from retrieval.duplicates.groups import read_group_file

    fsio.configure(storage_options)
    return read_group_file(entry, LOOKUP_SCHEMA.names)


def _rewrite(storage_options: dict | None, part: str, groups: pa.Table) -> dict:
    """A task: one part file collapsed by its grouped images' rows, written again atomically."""
    fsio.configure(storage_options)
    table = fsio.parquet_file(part).read()
    out = collapse(table, dict(zip(groups.column("image_id").to_pylist(), groups.column("group_id").to_pylist())))
    with fsio.atomic_open(part, "wb") as fh:
        pq.write_table(out, fh, compression="zstd")
    return {"rows": out.num_rows, "sha256": fsio.sha256_file(part), "rows_collapsed": table.num_rows - out.num_rows}


def collapse(table: pa.Table, group_of: dict[str, int]) -> pa.Table:
    """The result rows (in query order, then rank) with only each query's first row per group;
    ranks renumbered from 1 per query. A query's rows are a run of one ``query_id`` with rising
    ranks (two queries of one id in a row are two queries)."""
    if not table.num_rows or not group_of:
        return table
    queries = table.column("query_id").to_pylist()
    rank = table.column("rank").to_numpy()
    query = np.cumsum(np.r_[True, (np.array(queries[1:], object) != np.array(queries[:-1], object))
                            | (rank[1:] <= rank[:-1])])
    gallery = table.column("gallery_id").to_pylist()
    keep = np.ones(table.num_rows, bool)
    seen: set[tuple[int, int]] = set()
    for i, (q, g) in enumerate(zip(query.tolist(), gallery)):
        group = group_of.get(g)
        if group is not None:
            if (q, group) in seen:
                keep[i] = False
            seen.add((q, group))
    query = query[keep]
    first = np.r_[0, np.flatnonzero(query[1:] != query[:-1]) + 1] if len(query) else np.zeros(0, np.int64)
    ranks = (np.arange(len(query)) - np.repeat(first, np.diff(np.r_[first, len(query)])) + 1).astype(np.int32)
    out = table.filter(pa.array(keep))
    return out.set_column(out.schema.get_field_index("rank"), "rank", pa.array(ranks, pa.int32())).cast(table.schema)
