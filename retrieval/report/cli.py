"""``retrieval report --results URL --output URL [--truth CSV]`` (dispatched from retrieval.cli).

The report streams the results with pyarrow on the driver (bounded memory, no collect), so it
needs no Spark executors; under spark-submit the engine is simply not used."""
from __future__ import annotations

import argparse

from retrieval.config import Config
from retrieval.engine import Engine
from retrieval.report.job import build_report


def run_cli(args: argparse.Namespace, cfg: Config, engine: Engine) -> dict:
    return build_report(args.results, args.output, cfg, truth_url=getattr(args, "truth", None) or None,
                        overwrite=bool(getattr(args, "overwrite", False)))
