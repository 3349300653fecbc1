"""``retrieval duplicates``: near-duplicate groups of an index's gallery.

1. The gallery searched against itself with the search's two-stage cascade
   (:func:`retrieval.search.gallery.search_gallery`): each image's ``duplicates.k`` nearest other
   images, their rows in ``pairs/`` (the search's result schema).
2. The pairs kept: with false-match rates (``search.normalize.background`` set) those whose
   ``norm_score`` reaches the score at which a query with no copy in the gallery gets a false
   match with probability ``duplicates.max_fmr`` (:meth:`~retrieval.search.calibrate.NullTail.threshold`);
   without, those whose 512-d cosine ``score`` >= ``duplicates.min_score``. Self-pairs dropped.
3. The groups: the connected components of the kept pairs, computed by the engine
   (:meth:`retrieval.engine.Engine.connected_components`: large-star / small-star on Spark).
4. ``groups.parquet``, ``edges.parquet`` (:mod:`retrieval.duplicates.groups`) and ``_manifest.json``
   (groups, sizes histogram, the largest groups), written last.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import fsio, outputs
from retrieval.duplicates import groups as groups_mod
from retrieval.engine import Engine, as_engine
from retrieval.index.takedowns import read_list
from retrieval.search.calibrate import NullTail

log = logging.getLogger(__name__)


def choose_threshold(dup_cfg: Any, tail: NullTail | None) -> dict:
    """``{"column", "value", "source", "meaning"}``: the score a pair must reach to be kept."""
    if tail is not None:
        target = float(dup_cfg["max_fmr"])
        t = tail.threshold(target)
        return {"column": "norm_score", "value": t, "source": "max_fmr", "max_fmr": target,
                "meaning": f"norm_score >= {t:.4g}: an image with no copy in the gallery of {tail.gallery:,} "
                           f"images gets a false match this high with an estimated probability of {target:g}"}
    t = float(dup_cfg["min_score"])
    return {"column": "score", "value": t, "source": "min_score",
            "meaning": f"512-d cosine >= {t:g} (a fixed threshold: set search.normalize.background for one "
                       "from estimated false-match rates)"}


def _clean(output_url: str) -> None:
    """The marker first (incomplete from now on), then the files of an earlier run."""
    outputs.begin(output_url)
    fs, root = fsio.url_to_fs(output_url)
    root = root.rstrip("/")
    old = [f"{root}/{d}/*" for d in (groups_mod.PAIRS_DIR, groups_mod.GROUPS_DIR, groups_mod.EDGES_DIR)]
    for p in [q for g in old for q in fs.glob(g)] + fs.glob(f"{root}/*.parquet") + fs.glob(f"{root}/.tmp-*"):
        fs.rm(p, recursive=True)


def _write(output_url: str, name: str, table: pa.Table) -> None:
    with fsio.atomic_open(fsio.join(output_url, name), "wb") as fh:
        pq.write_table(table, fh, compression="zstd")


def _uris(pairs: pa.Table) -> dict[str, str]:
    """``image_id -> uri`` of the pairs' images; an id seen with several uris (a gallery holding an id
    twice: every feature row is a query) gets the greatest, as Spark's groupBy max gives."""
    ids = pa.concat_arrays([pairs.column("query_id").combine_chunks(), pairs.column("gallery_id").combine_chunks()])
    uris = pa.concat_arrays([pairs.column("query_uri").combine_chunks(), pairs.column("gallery_uri").combine_chunks()])
    best = pa.table({"id": ids, "uri": uris}).group_by("id").aggregate([("uri", "max")])
    return dict(zip(best.column("id").to_pylist(), best.column("uri_max").to_pylist()))


@outputs.leased
def duplicates(index_url: str, output_url: str, cfg, engine: Engine | Any = None, overwrite: bool = False) -> dict:
    """Near-duplicate groups of the gallery of ``index_url`` into ``output_url``; returns the manifest."""
    from retrieval.index import store
    from retrieval.search.gallery import search_gallery

    t0 = time.monotonic()
    engine = as_engine(engine)
    dup_cfg = cfg["duplicates"]
    outputs.configure_and_check_writable(output_url, cfg["io.storage_options"])
    ident = outputs.identity("duplicates", cfg, [index_url])
    outputs.check(output_url, ident, overwrite)
    index_manifest = store.read_index_manifest(index_url)
    outputs.claim(output_url, ident, cfg, overwrite)
    _clean(output_url)
    # each image finds itself first: k + 1 neighbours, no collapsing by an earlier run's groups
    search_cfg = cfg.with_overrides({"search.k": int(dup_cfg["k"]) + 1, "search.collapse_groups": None})
    run = search_gallery(index_url, index_manifest, fsio.join(output_url, groups_mod.PAIRS_DIR), search_cfg, engine,
                         dup_cfg["slice_images"], float(dup_cfg["slice_mb"]))
    t1 = time.monotonic()
    threshold = choose_threshold(dup_cfg, run.calibration)
    parts = [fsio.join(output_url, groups_mod.PAIRS_DIR, s["file"]) for s in sorted(run.stats, key=lambda s: s["chunk"])]
    # every feature row was a query, removed images' too (retrieval remove): their pairs are dropped
    removed = read_list(index_url).column("image_id").combine_chunks()
    column, value = threshold["column"], (float(threshold["value"]), removed)
    every = float(cfg["search.progress_seconds"])
    opts = cfg["io.storage_options"]       # the tasks below read and write the output: its storage options
    summary = engine.graph_groups(functools.partial(_kept_of, parts, column, value, opts), list(range(len(parts))),
                                  groups_mod.KEPT_PAIR_SCHEMA, functools.partial(_write_part, output_url, opts=opts),
                                  "duplicates groups", int(dup_cfg["largest"]), every=every)
    if summary is None:                 # the local engine: the groups made in memory
        summary = _in_memory(output_url, engine, parts, column, value, int(dup_cfg["largest"]), every)
    for name, schema in ((groups_mod.GROUPS_DIR, groups_mod.GROUP_SCHEMA), (groups_mod.EDGES_DIR, groups_mod.KEPT_SCHEMA)):
        if not any(f.startswith(name + "/") or f == name + ".parquet" for f in summary["files"]):
            summary["files"].append(_write_part(output_url, name, 0, schema.empty_table()))
    t2 = time.monotonic()
    manifest = outputs.commit(output_url, "duplicates", _manifest(
        index_url, output_url, index_manifest, run, threshold, summary,
        {"search_s": round(t1 - t0, 3), "components_s": round(t2 - t1, 3), "total_s": round(time.monotonic() - t0, 3)},
    ), engine=engine, cfg=cfg)
    c = manifest["counts"]
    log.info("duplicates done: %d images, %d pairs kept, %d groups holding %d images (largest %d) -> %s",
             c["images"], c["pairs_kept"], c["groups"], c["grouped_images"], c["largest_group"], output_url)
    return manifest


def _edges_of(parts: list[str], column: str, value: tuple[float, pa.Array], i: int) -> pa.Table:
    return groups_mod.edge_part(parts[i], column, *value)


def _kept_of(parts: list[str], column: str, value: tuple[float, pa.Array], opts: dict | None, i: int) -> pa.Table:
    fsio.configure(opts)
    return groups_mod.kept_pairs(parts[i], column, *value).cast(groups_mod.KEPT_PAIR_SCHEMA)


def _write_part(output_url: str, name: str, part: int, table: pa.Table, opts: dict | None = None) -> str:
    """A task of the engine's groups: one sorted part of ``groups/`` or ``edges/``."""
    fsio.configure(opts)
    schema = groups_mod.GROUP_SCHEMA if name == groups_mod.GROUPS_DIR else groups_mod.KEPT_SCHEMA
    file = f"{name}/part-{part:05d}.parquet"
    _write(output_url, file, table.select(schema.names).cast(schema))
    return file


def _in_memory(output_url: str, engine: Engine, parts: list[str], column: str, value: tuple[float, pa.Array],
               largest: int, every: float) -> dict:
    """The groups on one machine: the engine's ``(node, component)`` rows and the kept pairs in
    memory, ``groups.parquet`` and ``edges.parquet`` written whole."""
    components = engine.connected_components(functools.partial(_edges_of, parts, column, value),
                                             list(range(len(parts))), groups_mod.EDGE_SCHEMA, "duplicates groups",
                                             every=every)
    kept = pa.concat_tables([groups_mod.kept_pairs(p, column, *value) for p in parts]) if parts else None
    edges = groups_mod.unordered(kept) if kept is not None and kept.num_rows else \
        groups_mod.KEPT_SCHEMA.empty_table().drop_columns(["group_id"])
    groups, kept_edges = groups_mod.make_groups(components, edges, _uris(kept) if kept is not None else {})
    _write(output_url, groups_mod.GROUPS, groups)
    _write(output_url, groups_mod.EDGES, kept_edges)
    return {"pairs_kept": kept.num_rows if kept is not None else 0, "edges": kept_edges.num_rows,
            "sizes": groups_mod.size_counts(groups), "largest": groups_mod.largest(groups, largest),
            "files": [groups_mod.GROUPS, groups_mod.EDGES]}


def _manifest(index_url: str, output_url: str, index_manifest: dict, run, threshold: dict, summary: dict,
              timings: dict) -> dict:
    sizes, top = summary["sizes"], summary["largest"]
    names = summary["files"] + [f"{groups_mod.PAIRS_DIR}/{s['file']}" for s in
                                sorted(run.stats, key=lambda s: s["chunk"])]
    return {
        "index": index_url, "output": output_url, "model_version": index_manifest.get("model_version"),
        "threshold": threshold,
        "calibration": run.calibration.describe() if run.calibration is not None else None,
        "counts": {"images": int(index_manifest.get("ntotal") or sum(int(s.get("ntotal", 0))
                                                                     for s in index_manifest["shards"])), "pairs": sum(int(s["rows"]) for s in run.stats),
                   "pairs_kept": int(summary["pairs_kept"]), "edges": int(summary["edges"]),
                   "groups": sum(sizes.values()), "grouped_images": sum(s * n for s, n in sizes.items()),
                   "largest_group": top[0]["size"] if top else 0},
        "sizes": groups_mod.histogram(sizes), "largest": top, "params": run.params,
        "files": outputs.file_entries(output_url, names), "timings": timings,
    }
