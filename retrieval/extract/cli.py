"""``retrieval extract --input URL --output URL [--role gallery|query]``: argument handling only; the
work is :func:`retrieval.extract.job.extract`."""
from __future__ import annotations

import argparse

from retrieval.config import Config
from retrieval.engine import Engine


def run_cli(args: argparse.Namespace, cfg: Config, engine: Engine) -> dict:
    from retrieval.extract.job import extract

    m = extract(args.input, args.output, cfg, engine)
    return {"output": args.output, "counts": m["counts"], "model_version": m["model_version"],
            "timings": m["timings"]}
