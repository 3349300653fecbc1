"""``retrieval fit --input URL --output MODEL_URL``: argument handling only; the work is
:func:`retrieval.fit.job.fit`."""
from __future__ import annotations

import argparse

from retrieval.config import Config
from retrieval.engine import Engine


def run_cli(args: argparse.Namespace, cfg: Config, engine: Engine) -> dict:
    from retrieval.fit.job import fit

    card = fit(args.input, args.output, cfg, engine, overwrite=bool(getattr(args, "overwrite", False)))
    keep = ("output", "model_version", "base_model_version", "images_used", "image_errors", "timings")
    return {k: card[k] for k in keep} | {"adapter2": card["facts"]["adapter2"]}
