"""``retrieval report --results URL --output URL [--truth CSV]`` (dispatched from retrieval.cli).

The report streams the results with pyarrow on the driver (bounded memory, no collect), so it
needs no Spark executors; under spark-submit the session is simply not used."""
from __future__ import annotations

import argparse
from typing import Any

from retrieval.audit.report import build_report
from retrieval.config import Config


def run(args: argparse.Namespace, cfg: Config, spark: Any = None) -> dict:
    return build_report(args.results, args.output, cfg, truth_url=getattr(args, "truth", None) or None)
