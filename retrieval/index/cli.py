"""``retrieval index`` (old name ``build-index``): argument handling only; the work is :func:`retrieval.index.build.build_index`."""
from __future__ import annotations

import argparse
from retrieval.config import Config
from retrieval.engine import Engine


def run_cli(args: argparse.Namespace, cfg: Config, engine: Engine) -> dict:
    from retrieval.index.build import build_index

    m = build_index(args.features, args.output, cfg, engine, append=bool(args.append),
                    merge_ondisk=bool(getattr(args, "merge_ondisk", False)))
    q = m["quality"]
    return {"output": args.output, "index_key": m["index_key"], "ntotal": m["ntotal"],
            "shards": len(m["shards"]), "nprobe": m["nprobe"], "bytes_per_vector": m["bytes_per_vector"],
            "quality": {k: q[k] for k in ("recall@10", "recall@100", "cell_recall@10", "source_hit@100")
                        if k in q},
            "skipped": {k: v for k, v in m["skipped"].items() if k != "examples"},
            "model_version": m["model_version"], "merged": "merged" in m, "timings": m["timings"]}
