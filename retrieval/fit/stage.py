"""The ``fit`` stage: whitening (+ PCA heads, adapter-2 re-fit) fitted to a gallery sample -> a
checkpoint for ``model.checkpoint``.

    retrieval fit --input URL --output MODEL_URL

The work is :func:`retrieval.fit.job.fit`; its card (``<checkpoint>.card.json``) is its manifest."""
from __future__ import annotations

from typing import Any, Mapping

from retrieval.stage import Stage, arg, positive_or_auto, non_negative, positive


def run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> dict:
    from retrieval.fit.job import fit

    return fit(inputs["input"], output, cfg, engine, overwrite=bool(inputs.get("overwrite")))


def summary(card: dict, inputs: Mapping[str, Any], output: str | None) -> dict:
    keep = ("output", "model_version", "base_model_version", "images_used", "image_errors", "timings")
    return {k: card[k] for k in keep} | {"adapter2": card["facts"]["adapter2"]}


STAGE = Stage(
    name="fit",
    help="fit whitening (+ PCA heads, adapter-2 re-fit) of the model to a gallery sample -> a checkpoint "
         "for model.checkpoint",
    usage="--input URL --output MODEL_URL",
    args=(
        arg("--input", required=True, help="gallery images: directory, CSV/Parquet manifest, or Parquet with bytes"),
        arg("--output", required=True, help="checkpoint URL to write (then --set model.checkpoint=URL)"),
    ),
    run=run,
    summary=summary,
    section="fit",
    checks={
        "fit.sample": positive,
        "fit.seed": non_negative,
        "fit.shrinkage": lambda v: None if v == "auto" or 0.0 <= v <= 1.0 else "must be 'auto' or in [0, 1]",
        "fit.power": lambda v: None if 0.0 <= v <= 1.0 else "must be in [0, 1]",
        "fit.background_share": lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)",
        "fit.prior_share": lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)",
        "fit.adapter2_steps": non_negative,
        "fit.adapter2_lr": positive,
        "fit.batch_size": positive,
        "fit.threads": positive_or_auto,
        "fit.progress_seconds": positive,
    },
)
