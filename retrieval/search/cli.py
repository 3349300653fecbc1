"""``retrieval search --queries URL --index URL --output URL`` (dispatched from retrieval.cli)."""
from __future__ import annotations


def run(args, cfg, spark) -> dict:
    from retrieval.search.job import search

    m = search(args.queries, args.index, args.output, cfg, spark)
    return {"output": args.output, "counts": m["counts"], "model_version": m["model_version"],
            "params": m["params"], "timings": m["timings"]}
