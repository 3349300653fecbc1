"""The ``search`` stage: two-stage search, coarse IVF-PQ per shard, merge, exact 512-d rerank.

    retrieval search --queries URL --index URL --output URL

The work is :func:`retrieval.search.job.search`."""
from __future__ import annotations

from typing import Any, Mapping

from retrieval.stage import Stage, arg, boolean, choice, non_negative, number, positive, positive_or_auto, whole_or_auto


def run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> dict:
    from retrieval.search.job import search

    return search(inputs["queries"], inputs["index"], output, cfg, engine, overwrite=bool(inputs.get("overwrite")))


def summary(m: dict, inputs: Mapping[str, Any], output: str | None) -> dict:
    return {"output": output, "counts": m["counts"], "model_version": m["model_version"],
            "params": m["params"], "timings": m["timings"]}


STAGE = Stage(
    name="search",
    help="two-stage search: coarse IVF-PQ per shard, merge, exact 512-d rerank",
    usage="--queries URL --index URL --output URL",
    args=(
        arg("--queries", required=True, help="query images (any extract input) or query features"),
        arg("--index", required=True, help="index output URL"),
        arg("--output", required=True, help="results output URL (a directory of Parquet match rows)"),
    ),
    run=run,
    summary=summary,
    section="search",
    checks={
        "search.shortlist": positive_or_auto,
        "search.shard_shortlist": positive_or_auto,
        "search.k": positive,
        "search.nprobe": positive_or_auto,
        "search.coarse_threshold": lambda v: None if -1.0 <= v <= 1.0 else "must be in [-1, 1]",
        "search.match_threshold": lambda v: None if -1.0 <= v <= 1.0 else "must be in [-1, 1]",
        "search.query_chunk": positive,
        "search.vector_cache_mb": non_negative,
        "search.rerank": choice("auto", "chunk", "gallery"),
        "search.fine_layout": choice("auto", "files", "lists"),
        "search.shard_cache": positive,
        "search.threads": positive_or_auto,
        "search.progress_seconds": positive,
        "search.region_margin": lambda v: None if isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 else "must be a number in [0, 1]",
        "search.normalize.k": positive,
        "search.normalize.fmr_queries": positive,
        "search.normalize.beta": non_negative,
        "search.normalize.sample": positive,
        "search.normalize.seed": non_negative,
        "search.geometric.top": whole_or_auto,
        "search.geometric.method": choice("orb", "sift"),
        "search.geometric.model": choice("homography", "affine"),
        "search.geometric.features": positive,
        "search.geometric.ratio": lambda v: None if 0.0 < v <= 1.0 else "must be in (0, 1]",
        "search.geometric.max_side": positive,
        "search.geometric.flip": boolean,
        "search.geometric.regions": boolean,
        "search.geometric.min_inliers": non_negative,
        "search.geometric.boost": non_negative,
        "search.geometric.cap": positive,
        "search.geometric.reproj": positive,
        "search.geometric.cache": positive,
        "search.geometric.iters": positive,
        "search.geometric.gate": number,
        "search.geometric.early": boolean,
    },
    nullable={"search.collapse_groups": str},
)
