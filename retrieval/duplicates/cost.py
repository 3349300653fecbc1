"""The ``duplicates`` line of the capacity plan (:func:`retrieval.plan.plan`)."""
from __future__ import annotations

from typing import Any, Callable


def duplicates_stage(p: dict, self_search: dict, cluster: Any, read_bytes_per_executor_s: float,
                     fmt_time: Callable[[float], str], fmt_bytes: Callable[[float], str], cfg=None) -> dict:
    """``retrieval duplicates``: the gallery searched against itself (the search's model with every
    image a query), then large-star / small-star rounds over the kept pairs (ASSUMED: half a kept
    pair per image, 12 rounds, each shuffling the edges ~4 times at 2 x 40 B an edge)."""
    from retrieval import config

    cfg = cfg if cfg is not None else config.load()
    n, k = p["images"], int(cfg["duplicates.k"]) + 1
    edges = 0.5 * n
    cc_bytes = 12 * 4 * edges * 80.0
    cc_s = cc_bytes / (read_bytes_per_executor_s * cluster.executors)
    mem = cluster.executor_memory_gb / max(1, cluster.executor_cores) * 1e9
    warn = [f"duplicates: the self-search's tasks need {fmt_bytes(self_search['memory_per_task'])} (every image a "
            f"query: the {self_search.get('rerank', {}).get('mode', '')}-major rerank's pairs per task), more than "
            f"{fmt_bytes(mem)} per core: no run at this size fits without slicing the queries (not implemented)"
            ] if self_search["memory_per_task"] > mem else []
    return {"tasks": self_search["tasks"] + 12 * 4 * max(1, cluster.cores), "wall": self_search["wall"] + cc_s,
            "basis": f"self-search of {n:.3g} images (k {k}) {fmt_time(self_search['wall'])}; components "
                     f"(ASSUMED {edges:.3g} kept pairs, 12 rounds) shuffle {fmt_bytes(cc_bytes)} {fmt_time(cc_s)}",
            "storage": n * k * 120.0, "memory_per_task": self_search["memory_per_task"],
            "rerank": self_search.get("rerank"), "warnings": warn}
