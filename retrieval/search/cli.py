"""``retrieval search --queries URL --index URL --output URL``: argument handling only; the work is
:func:`retrieval.search.job.search`."""
from __future__ import annotations

import argparse

from retrieval.config import Config
from retrieval.engine import Engine


def run_cli(args: argparse.Namespace, cfg: Config, engine: Engine) -> dict:
    from retrieval.search.job import search

    m = search(args.queries, args.index, args.output, cfg, engine, overwrite=bool(getattr(args, "overwrite", False)))
    return {"output": args.output, "counts": m["counts"], "model_version": m["model_version"],
            "params": m["params"], "timings": m["timings"]}
