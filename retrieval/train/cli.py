"""``retrieval train --input URL --output URL``: run the selected stages, single-process or (with
``train.processes > 1`` and Spark) data parallel through ``TorchDistributor``."""
from __future__ import annotations

import argparse
import logging

from retrieval import outputs
from retrieval.config import Config
from retrieval.engine import Engine
from retrieval.train.trainer import TrainJob, run_distributed, run_training

log = logging.getLogger(__name__)


@outputs.leased
def run_cli(args: argparse.Namespace, cfg: Config, engine: Engine) -> dict:
    job = TrainJob.from_config(args.input, args.output, cfg)
    outputs.claim(args.output, outputs.identity("train", cfg, [args.input, cfg["train.eval_input"]]), cfg,
                  bool(getattr(args, "overwrite", False)))
    processes = int(cfg["train.processes"])
    if processes > 1:
        card = run_distributed(engine, job, processes, local_mode=cfg["train.local_mode"],
                               use_gpu=cfg["model.device"] == "cuda")
    else:
        card = run_training(job)
    return {"output": args.output, "model_version": card["model_version"], "checkpoint": card["checkpoint"],
            "stages": {s: {"steps": st.get("steps"), "final_loss": st.get("final_loss")}
                       for s, st in card["stages"].items()},
            "evaluation": {k: {m: v for m, v in r.items() if isinstance(v, float)}
                           for k, r in (card.get("evaluation") or {}).get("models", {}).items()} or None}
