"""The files of a duplicates output and their reader, and the task bodies that make them.

``groups.parquet``: one row per image in a group of two or more (an image in no group is in no
row), sorted by ``group_id`` then ``image_id``:

==============  ========  =====================================================================
column          type      meaning
==============  ========  =====================================================================
image_id        string    the gallery image
uri             string    where it was read from
group_id        int64     0 = the largest group, then by size (ties: the smallest member's id)
representative  string    the member linked to the most others (ties: the smallest id)
size            int64     the group's number of images
degree          int32     the image's kept pairs (links to other members)
==============  ========  =====================================================================

On Spark the same rows are written as sorted parts, ``groups/part-NNNNN.parquet`` and
``edges/part-NNNNN.parquet`` (no part for an empty table); :func:`read_groups` and
:func:`read_edges` read either form.

``edges.parquet``: the kept pairs, once per unordered pair (``image_a < image_b``), with the best
score either direction found (``score``, ``norm_score``) and their ``group_id``. A group is a
connected component of these pairs: two images are in one group when a chain of kept pairs joins
them, not only when they match each other.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval import fsio, outputs

GROUPS = "groups.parquet"
EDGES = "edges.parquet"
PAIRS_DIR = "pairs"            # the self-search's result rows (the search's schema), one file per chunk
EDGE_SCHEMA = pa.schema([("src", pa.string()), ("dst", pa.string())])
GROUP_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("group_id", pa.int64()),
                          ("representative", pa.string()), ("size", pa.int64()), ("degree", pa.int32())])
KEPT_SCHEMA = pa.schema([("image_a", pa.string()), ("image_b", pa.string()), ("score", pa.float32()),
                         ("norm_score", pa.float32()), ("group_id", pa.int64())])
PAIR_COLUMNS = ["query_id", "gallery_id", "query_uri", "gallery_uri", "score", "norm_score"]
KEPT_PAIR_SCHEMA = pa.schema([("query_id", pa.string()), ("gallery_id", pa.string()), ("query_uri", pa.string()),
                              ("gallery_uri", pa.string()), ("score", pa.float32()), ("norm_score", pa.float32())])
GROUPS_DIR, EDGES_DIR = "groups", "edges"   # the same tables in sorted parts, as Spark writes them


def kept_pairs(url: str, column: str, threshold: float, removed: pa.Array | None = None) -> pa.Table:
    """The rows of one result part file whose ``column`` >= ``threshold``, self-pairs and the pairs
    of ``removed`` images (the index's takedown list) dropped."""
    t = fsio.parquet_file(url).read(columns=PAIR_COLUMNS)
    keep = pc.and_(pc.greater_equal(t.column(column), threshold),
                   pc.not_equal(t.column("query_id"), t.column("gallery_id")))
    if removed is not None and len(removed):
        keep = pc.and_(keep, pc.invert(pc.or_(pc.is_in(t.column("query_id"), value_set=removed),
                                              pc.is_in(t.column("gallery_id"), value_set=removed))))
    return t.filter(pc.fill_null(keep, False))


def edge_part(url: str, column: str, threshold: float, removed: pa.Array | None = None) -> pa.Table:
    """A task body of the components: the kept pairs of one part file as edges ``(src, dst)``."""
    t = kept_pairs(url, column, threshold, removed)
    return pa.table({"src": t.column("query_id"), "dst": t.column("gallery_id")}, schema=EDGE_SCHEMA)


def unordered(pairs: pa.Table) -> pa.Table:
    """One row per unordered pair (``image_a < image_b``), the best scores either way found."""
    import pandas as pd

    df = pairs.select(["query_id", "gallery_id", "score", "norm_score"]).to_pandas()
    a = np.where(df.query_id < df.gallery_id, df.query_id, df.gallery_id)
    b = np.where(df.query_id < df.gallery_id, df.gallery_id, df.query_id)
    df = pd.DataFrame({"image_a": a, "image_b": b, "score": df.score, "norm_score": df.norm_score})
    df = df.groupby(["image_a", "image_b"], as_index=False, sort=True).max()
    return pa.Table.from_pandas(df, preserve_index=False)


def make_groups(components: pa.Table, edges: pa.Table, uris: dict[str, str]) -> tuple[pa.Table, pa.Table]:
    """``(groups, kept edges)`` (:data:`GROUP_SCHEMA`, :data:`KEPT_SCHEMA`) from the engine's
    ``(node, component)`` rows and the unordered kept pairs."""
    import pandas as pd

    if not components.num_rows:
        return GROUP_SCHEMA.empty_table(), KEPT_SCHEMA.empty_table()
    comp = components.to_pandas()
    deg = pd.concat([edges.column("image_a").to_pandas(), edges.column("image_b").to_pandas()]).value_counts()
    comp["degree"] = comp.node.map(deg).fillna(0).astype(np.int32)
    comp["size"] = comp.groupby("component").node.transform("size").astype(np.int64)
    comp = comp[comp["size"] >= 2]
    order = comp[["component", "size"]].drop_duplicates().sort_values(["size", "component"],
                                                                         ascending=[False, True])
    gid = pd.Series(np.arange(len(order), dtype=np.int64), index=order.component.to_numpy())
    comp["group_id"] = comp.component.map(gid).astype(np.int64)
    best = comp.sort_values(["group_id", "degree", "node"], ascending=[True, False, True]) \
        .drop_duplicates("group_id").set_index("group_id").node
    comp["representative"] = comp.group_id.map(best)
    comp = comp.sort_values(["group_id", "node"])
    groups = pa.table({"image_id": comp.node.to_numpy(), "uri": comp.node.map(uris).to_numpy(),
                       "group_id": comp.group_id.to_numpy(), "representative": comp.representative.to_numpy(),
                       "size": comp["size"].to_numpy(), "degree": comp.degree.to_numpy()}, schema=GROUP_SCHEMA)
    of = dict(zip(comp.node, comp.group_id))
    kept = edges.append_column("group_id", pa.array([of[a] for a in edges.column("image_a").to_pylist()],
                                                    pa.int64()))
    return groups, kept.select(KEPT_SCHEMA.names).cast(KEPT_SCHEMA)


def size_counts(groups: pa.Table) -> dict[int, int]:
    """``size -> number of groups`` of a groups table."""
    sizes = groups.group_by("group_id").aggregate([("size", "max")]).column("size_max").to_numpy()
    values, counts = np.unique(sizes, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def size_histogram(groups: pa.Table) -> dict[str, int]:
    """Groups by size, in power-of-two bins (``"2"``, ``"3-4"``, ``"5-8"``, ...)."""
    return histogram(size_counts(groups))


def histogram(counts: dict[int, int]) -> dict[str, int]:
    """``size -> groups`` in power-of-two bins (``"2"``, ``"3-4"``, ``"5-8"``, ...)."""
    out: dict[str, int] = {}
    lo = 2
    top = max(counts) if counts else 0
    while lo <= top:
        hi = 2 if lo == 2 else lo * 2 - 2
        n = sum(c for s, c in counts.items() if lo <= s <= hi)
        if n:
            out[str(lo) if lo == hi else f"{lo}-{hi}"] = n
        lo = hi + 1
    return out


def largest(groups: pa.Table, n: int) -> list[dict]:
    """The ``n`` largest groups: ``group_id``, ``size``, ``representative``."""
    first = groups.filter(pc.less(groups.column("group_id"), n))
    seen: dict[int, dict] = {}
    for g, s, r in zip(*(first.column(c).to_pylist() for c in ("group_id", "size", "representative"))):
        seen.setdefault(g, {"group_id": g, "size": s, "representative": r})
    return [seen[g] for g in sorted(seen)]


def read_manifest(url: str) -> dict:
    """The duplicates output's manifest (refused when missing, incomplete, or another stage's)."""
    return outputs.read(url, "duplicates", " (run retrieval duplicates first)")


def read_groups(url: str, columns: Sequence[str] | None = None, verify: bool = True) -> pa.Table:
    """The groups of a complete duplicates output, ``groups.parquet`` or the parts of ``groups/``
    in order (each sha256-checked against its manifest)."""
    return _read(url, GROUPS, GROUPS_DIR, GROUP_SCHEMA, columns, verify)


def read_edges(url: str, columns: Sequence[str] | None = None, verify: bool = True) -> pa.Table:
    """The kept pairs of a complete duplicates output, ``edges.parquet`` or the parts of ``edges/``."""
    return _read(url, EDGES, EDGES_DIR, KEPT_SCHEMA, columns, verify)


def group_files(url: str) -> list[tuple[str, str | None]]:
    """``(url, sha256)`` of the files holding the groups of a complete duplicates output, in order:
    ``groups.parquet`` or the parts of ``groups/``."""
    return _files(url, GROUPS, GROUPS_DIR)


def read_group_file(entry: tuple[str, str | None], columns: Sequence[str] | None = None,
                    verify: bool = True) -> pa.Table:
    """One file of :func:`group_files`, its sha256 checked against the manifest's."""
    return _read_file(entry, list(columns) if columns else GROUP_SCHEMA.names, verify)


def _files(url: str, whole: str, folder: str) -> list[tuple[str, str | None]]:
    manifest = read_manifest(url)
    entries = [f for f in manifest.get("files", []) if f.get("file") == whole
               or str(f.get("file", "")).startswith(folder + "/")]
    if not entries:             # an output written before parts, or its manifest without files
        entries = [{"file": whole}]
    return [(fsio.join(url, e["file"]), e.get("sha256")) for e in sorted(entries, key=lambda f: f["file"])]


def _read_file(entry: tuple[str, str | None], names: list[str], verify: bool) -> pa.Table:
    path, sha = entry
    if verify and fsio.sha256_file(path) != sha:
        raise ValueError(f"{path} does not match the sha256 in its manifest (truncated or altered)")
    return fsio.parquet_file(path).read(columns=names)


def _read(url: str, whole: str, folder: str, schema: pa.Schema, columns: Sequence[str] | None,
          verify: bool) -> pa.Table:
    names = list(columns) if columns else schema.names
    tables = [_read_file(e, names, verify) for e in _files(url, whole, folder)]
    return pa.concat_tables(tables) if tables else schema.empty_table().select(names)
