"""One row per near-duplicate group (``search.collapse_groups``: a duplicates output's URL).

A gallery holding ten copies of one picture answers a query with ten rows of it. With the groups
of ``retrieval duplicates`` a query keeps its best-ranked match of each group (and every match
in no group); the others are dropped and the ranks renumbered 1..n, so a query can get fewer
than ``search.k`` rows. The groups travel to the tasks as a broadcast of the grouped images only
(``image_id -> group_id``; an image in no group is in no row)."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)


def load_groups(url: str | None, index_url: str, index_manifest: dict) -> dict[str, int] | None:
    """``image_id -> group_id`` of the duplicates output ``url`` (None when off), checked against the
    index (same model; a duplicates output of another index is named in a warning)."""
    if not url:
        return None
    from retrieval.duplicates.groups import read_groups, read_manifest

    manifest = read_manifest(url)
    if manifest.get("model_version") != index_manifest.get("model_version"):
        raise ValueError(f"search.collapse_groups {url} grouped a gallery encoded by "
                         f"{manifest.get('model_version')!r}, the index {index_url} by "
                         f"{index_manifest.get('model_version')!r}: run retrieval duplicates on this index")
    if str(manifest.get("index", "")).rstrip("/") != index_url.rstrip("/"):
        log.warning("search.collapse_groups %s grouped the gallery of %s, not of %s: images it does not "
                    "know are not collapsed", url, manifest.get("index"), index_url)
    t = read_groups(url, ["image_id", "group_id"])
    return dict(zip(t.column("image_id").to_pylist(), t.column("group_id").to_pylist()))


def collapse(table: pa.Table, group_of: dict[str, int]) -> pa.Table:
    """The result rows (in query order, then rank) with only each query's first row per group;
    ranks renumbered from 1 per query."""
    if not table.num_rows or not group_of:
        return table
    queries = table.column("query_id").to_pylist()
    gallery = table.column("gallery_id").to_pylist()
    keep = np.ones(table.num_rows, bool)
    seen: set[tuple[str, int]] = set()
    for i, (q, g) in enumerate(zip(queries, gallery)):
        group = group_of.get(g)
        if group is not None:
            if (q, group) in seen:
                keep[i] = False
            seen.add((q, group))
    out = table.filter(pa.array(keep))
    q = out.column("query_id").to_pylist()
    ranks = np.ones(len(q), np.int32)
    for i in range(1, len(q)):
        if q[i] == q[i - 1]:
            ranks[i] = ranks[i - 1] + 1
    return out.set_column(out.schema.get_field_index("rank"), "rank", pa.array(ranks, pa.int32())) \
        .cast(table.schema) if len(q) else out
