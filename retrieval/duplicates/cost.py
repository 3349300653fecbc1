"""The ``duplicates`` line of the capacity plan (:func:`retrieval.plan.plan`)."""
from __future__ import annotations

import math
from typing import Any, Callable


def duplicates_stage(p: dict, search_of: Callable[[int], dict], cluster: Any, read_bytes_per_executor_s: float,
                     fmt_time: Callable[[float], str], fmt_bytes: Callable[[float], str], cfg=None) -> dict:
    """``retrieval duplicates``: the gallery searched against itself in slices of the queries
    (:func:`retrieval.search.gallery.slice_queries`: ``search_of(queries)`` is the search line for
    that many queries; every slice is one such search), then large-star / small-star rounds over
    the kept pairs (ASSUMED: half a kept pair per image, 12 rounds, each shuffling the edges ~4
    times at 2 x 40 B an edge)."""
    from retrieval import config
    from retrieval.search.gallery import slice_queries

    cfg = cfg if cfg is not None else config.load()
    n, k = p["images"], int(cfg["duplicates.k"]) + 1
    whole = search_of(n)
    rr = whole.get("rerank", {})
    per = slice_queries(cfg["duplicates.slice_images"], rr.get("mode", "chunk"), int(rr.get("blocks", 0)),
                        int(p["shortlist"]), float(cfg["duplicates.slice_mb"]), n)
    slices = max(1, math.ceil(n / per))
    one = whole if slices == 1 else search_of(min(n, per))
    wall, tasks = one["wall"] * slices, one["tasks"] * slices
    edges = 0.5 * n
    cc_bytes = 12 * 4 * edges * 80.0
    cc_s = cc_bytes / (read_bytes_per_executor_s * cluster.executors)
    mem = cluster.executor_memory_gb / max(1, cluster.executor_cores) * 1e9
    warn = [f"duplicates: the self-search's tasks need {fmt_bytes(one['memory_per_task'])} per task, more than "
            f"{fmt_bytes(mem)} per core: a smaller duplicates.slice_mb (or slice_images) bounds them"
            ] if one["memory_per_task"] > mem else []
    sliced = (f"{slices:,} slices of {per:.3g} images (each {fmt_time(one['wall'])}, its "
              f"{rr.get('mode', '')}-major rerank reading the fine column again)" if slices > 1 else "one slice")
    return {"tasks": tasks + 12 * 4 * max(1, cluster.cores), "wall": wall + cc_s,
            "basis": f"self-search of {n:.3g} images (k {k}) in {sliced} {fmt_time(wall)}; components "
                     f"(ASSUMED {edges:.3g} kept pairs, 12 rounds) shuffle {fmt_bytes(cc_bytes)} {fmt_time(cc_s)}",
            "storage": n * k * 120.0, "memory_per_task": one["memory_per_task"], "slices": slices,
            "slice_images": per, "unsliced_memory_per_task": whole["memory_per_task"],
            "rerank": one.get("rerank"), "warnings": warn}
