"""The ``train`` stage: run the selected training stages, single-process or (with
``train.processes > 1`` and Spark) data parallel through ``TorchDistributor``.

    retrieval train --input URL --output URL

The work is :mod:`retrieval.train.trainer`."""
from __future__ import annotations

from typing import Any, Mapping

from retrieval import outputs
from retrieval.stage import Stage, arg, positive_or_auto, choice, non_negative, positive


def _augmentations(v: Any) -> str | None:
    from retrieval.train.augment import OPS   # the one list of the augmentations' names

    unknown = sorted(set(v) - set(OPS))
    return f"unknown augmentation(s) {unknown}; choose from {', '.join(OPS)}" if unknown else None


@outputs.leased
def run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> dict:
    from retrieval.train.trainer import TrainJob, run_distributed, run_training

    job = TrainJob.from_config(inputs["input"], output, cfg)
    outputs.claim(output, outputs.identity("train", cfg, [inputs["input"], cfg["train.eval_input"]]), cfg,
                  bool(inputs.get("overwrite")))
    processes = int(cfg["train.processes"])
    if processes > 1:
        return run_distributed(engine, job, processes, local_mode=cfg["train.local_mode"],
                               use_gpu=cfg["model.device"] == "cuda")
    return run_training(job)


def summary(card: dict, inputs: Mapping[str, Any], output: str | None) -> dict:
    return {"output": output, "model_version": card["model_version"], "checkpoint": card["checkpoint"],
            "stages": {s: {"steps": st.get("steps"), "final_loss": st.get("final_loss")}
                       for s, st in card["stages"].items()},
            "evaluation": {k: {m: v for m, v in r.items() if isinstance(v, float)}
                           for k, r in (card.get("evaluation") or {}).get("models", {}).items()} or None}


STAGE = Stage(
    name="train",
    help="three-stage training of the descriptor model",
    usage="--input URL --output URL",
    args=(
        arg("--input", required=True, help="training images: directory, CSV/Parquet manifest, or Parquet with bytes"),
        arg("--output", required=True, help="checkpoint directory URL"),
    ),
    run=run,
    summary=summary,
    section="train",
    checks={
        "train.stages": lambda v: None if v and all(s in (1, 2, 3) for s in v) and list(v) == sorted(set(v))
        else "must be a non-empty ascending list drawn from 1, 2, 3",
        "train.batch_size": lambda v: None if v >= 2 else "must be >= 2 (the other images are the negatives)",
        "train.temperature": positive,
        "train.augment_strength": lambda v: None if 0.0 <= v <= 1.0 else "must be in [0, 1]",
        "train.augmentations": _augmentations,
        "train.koleo": non_negative,
        "train.teacher_weight": non_negative,
        "train.teacher_temperature": positive,
        "train.teacher_size": lambda v: None if 32 <= v <= 1024 else "must be in [32, 1024]",
        "train.max_side": lambda v: None if v >= 32 else "must be >= 32",
        "train.backbone_blocks": non_negative,
        "train.cache_views": non_negative,
        "train.weight_decay": non_negative,
        "train.stage1.steps": non_negative,
        "train.stage2.steps": non_negative,
        "train.stage3.steps": non_negative,
        "train.stage1.lr": positive,
        "train.stage2.lr": positive,
        "train.stage3.lr": positive,
        "train.stage3.init": choice("adapter1", "keep"),
        "train.checkpoint_every": positive,
        "train.keep_checkpoints": positive,
        "train.processes": positive,
        "train.threads": positive_or_auto,
        "train.progress_seconds": positive,
        "train.eval_copies": positive,
        "train.eval_shortlist": positive,
    },
)
