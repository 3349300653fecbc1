"""The ``duplicates`` stage: near-duplicate groups of an index's gallery.

    retrieval duplicates --index URL --output URL

The work is :func:`retrieval.duplicates.job.duplicates`; docs/lifecycle.md has a worked example."""
from __future__ import annotations

from typing import Any, Mapping

from retrieval.stage import Stage, arg, between, positive, positive_or_auto


def run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> dict:
    from retrieval.duplicates.job import duplicates

    return duplicates(inputs["index"], output, cfg, engine, overwrite=bool(inputs.get("overwrite")))


def summary(m: dict, inputs: Mapping[str, Any], output: str | None) -> dict:
    return {"output": output, "counts": m["counts"], "sizes": m["sizes"], "largest": m["largest"][:5],
            "threshold": {k: v for k, v in m["threshold"].items() if k != "meaning"}, "timings": m["timings"]}


STAGE = Stage(
    name="duplicates",
    help="near-duplicate groups: the gallery searched against itself, pairs above a threshold, connected components",
    usage="--index URL --output URL",
    args=(
        arg("--index", required=True, help="index output URL (its gallery is grouped)"),
        arg("--output", required=True, help="duplicates output URL (groups.parquet, edges.parquet, pairs/)"),
    ),
    run=run,
    summary=summary,
    section="duplicates",
    checks={
        "duplicates.k": positive,
        "duplicates.min_score": between(-1.0, 1.0),
        "duplicates.max_fmr": lambda v: None if 0.0 < v < 1.0 else "must be in (0, 1)",
        "duplicates.largest": positive,
        "duplicates.slice_images": positive_or_auto,
        "duplicates.slice_mb": positive,
    },
)
