"""The ``index`` stage (old name ``build-index``): gallery feature shards -> sharded faiss IVF-PQ index.

    retrieval index --features URL --output URL [--append] [--merge-ondisk]
    retrieval index --compact --output URL

The work is :func:`retrieval.index.build.build_index` (:func:`retrieval.index.compact.compact`)."""
from __future__ import annotations

from typing import Any, Mapping

from retrieval.stage import Stage, arg, boolean, choice, non_negative, positive, positive_or_auto


def run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> dict:
    from retrieval.index.build import build_index

    if inputs.get("compact"):
        if inputs.get("features") or inputs.get("append"):
            raise ValueError("index --compact takes only --output (the index to compact)")
        from retrieval.index.compact import compact

        return compact(output, cfg, engine)
    if not inputs.get("features"):
        raise ValueError("index: --features is required (or --compact, to compact the index at --output)")
    return build_index(inputs["features"], output, cfg, engine, append=bool(inputs.get("append")),
                       merge_ondisk=bool(inputs.get("merge_ondisk")))


def summary(m: dict, inputs: Mapping[str, Any], output: str | None) -> dict:
    q = m["quality"]
    return {"output": output, "index_key": m["index_key"], "ntotal": m["ntotal"],
            "shards": len(m["shards"]), "nprobe": m["nprobe"], "bytes_per_vector": m["bytes_per_vector"],
            "quality": {k: q[k] for k in ("recall@10", "recall@100", "cell_recall@10", "source_hit@100")
                        if k in q},
            "skipped": {k: v for k, v in m["skipped"].items() if k != "examples"},
            "model_version": m["model_version"], "merged": "merged" in m, "timings": m["timings"],
            **({"live": m.get("live"), "takedowns": {k: v for k, v in m["takedowns"].items() if k in (
                "removed_ids", "tombstoned_rows", "compacted_rows")} | {"last": m["takedowns"]["batches"][-1:]}}
               if m.get("takedowns") else {})}


STAGE = Stage(
    name="index",
    help="gallery feature shards -> sharded faiss IVF-PQ index (old name: build-index)",
    usage="--features URL --output URL",
    args=(
        arg("--features", action="append",
            help="feature output URL (repeatable; with --append, the new shards to add); required "
                 "unless --compact"),
        arg("--output", required=True, help="index output URL (a directory)"),
        arg("--append", action="store_true", help="add new features to an existing index"),
        arg("--compact", action="store_true",
            help="drop the rows removed by 'retrieval remove' from the index at --output physically"),
        arg("--merge-ondisk", action="store_true",
            help="also merge the shards into one on-disk index (single-machine serving)"),
    ),
    run=run,
    summary=summary,
    section="index",
    checks={
        "index.index_key": lambda v: None if v.strip() else "must be 'auto' or a faiss factory string",
        "index.bytes_per_vector": positive,
        "index.max_pq_bytes": positive,
        "index.nlist": positive_or_auto,
        "index.train_points_per_centroid": positive,
        "index.max_train_points": positive,
        "index.kmeans": choice("auto", "flat", "two_level"),
        "index.kmeans_iters": positive,
        "index.vectors_per_shard": positive,
        "index.fine_by_list": boolean,
        "index.nprobe": positive_or_auto,
        "index.max_nprobe": positive,
        "index.target_recall": lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
        "index.quality_queries": non_negative,
        "index.quality_noise": non_negative,
        "index.tune_noise": non_negative,
        "index.tune_queries": non_negative,
        "index.duplicates": choice("skip", "error", "keep"),
        "index.dedup_on_driver_max": non_negative,
        "index.mode": choice("incremental", "overwrite"),
        "index.batch_rows": positive,
        "index.threads": positive_or_auto,
        "index.seed": non_negative,
        "index.progress_seconds": positive,
    },
    aliases=("build-index",),
    job_aliases=("build_index",),
)
