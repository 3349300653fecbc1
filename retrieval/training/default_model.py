"""Reproduce the shipped default model (``retrieval/assets/default_model.npz``).

    python -m retrieval.training.default_model --output /tmp/default-model-run \
        [--asset retrieval/assets/default_model.npz] [--set train.seed=0 ...]

1. writes a manifest of the offline real photos of the ``train`` split
   (:func:`retrieval.sample.real_photos`; the ``holdout`` split is never trained on) and one of
   the ``holdout`` photos (used only for the model card's evaluation);
2. runs the training job (the same library code as ``retrieval train``) with :data:`RECIPE` on top
   of the defaults, from the ImageNet MobileNetV2 backbone and the seed-0 heads;
3. exports the result as a compact delta (:mod:`retrieval.training.delta`) to ``--asset`` and
   writes the model card beside it (``default_model.card.json`` / ``.md``).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time

from retrieval import config as config_mod
from retrieval import fsio

log = logging.getLogger(__name__)

# the training images: the train split of the offline photos. The shipped asset (d08eba97a5414297)
# was trained by an earlier version of this recipe that also used a Debian package of photo cut-outs
# that is now reserved for independent evaluation (DEVELOPERS.md, "Data"); that source is gone from
# the recipe, and the shipped model is to be replaced by one trained on allowed data only (issue 12).
RECIPE_SOURCES = {"real_photos_train": True}
# the settings the shipped model was trained with (on top of retrieval/conf/defaults.yaml)
RECIPE: dict = {
    "model.checkpoint": "",          # start from the ImageNet backbone + seed heads, whatever the default
    "train.stages": [2, 3],
    "train.seed": 0,
    "train.batch_size": 32,
    "train.temperature": 0.02,
    "train.cache_views": 16,
    "train.augment_strength": 0.5,
    "train.stage2.steps": 150,
    "train.stage2.lr": 0.001,
    "train.stage3.steps": 300,
    "train.stage3.lr": 0.0001,
    "train.eval_copies": 3,
}


def write_manifest(paths: list[str], url: str) -> str:
    """A CSV manifest (``image_id,uri``); ids are base names."""
    with fsio.atomic_open(url, "w") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "uri"])
        for p in paths:
            w.writerow([os.path.basename(p), p])
    return url


def _display(path: str) -> str:
    """The asset path relative to the repository when it lies inside it (cards are committed)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    full = os.path.abspath(path)
    return os.path.relpath(full, repo) if full.startswith(repo + os.sep) else path


def reproduce(output: str, asset: str, sets: list[str] = (), conf: list[str] = ()) -> dict:
    from retrieval.sample import real_photos
    from retrieval.training.card import to_markdown
    from retrieval.training.delta import export_delta, load_delta
    from retrieval.training.trainer import TrainJob, run_training

    t0 = time.monotonic()
    photos = real_photos("train")
    train = write_manifest(photos, fsio.join(output, "train_images.csv"))
    holdout = write_manifest(real_photos("holdout"), fsio.join(output, "holdout_photos.csv"))
    # the recipe first, then the caller's --set items (which win), then the held-out input
    recipe_sets = [f"{k}={json.dumps(v)}" for k, v in RECIPE.items()]
    cfg = config_mod.load(conf, [*recipe_sets, *sets], {"train.eval_input": holdout})
    job = TrainJob.from_config(train, fsio.join(output, "run"), cfg)
    card = run_training(job)
    from retrieval.features.model import load_checkpoint

    trained = load_checkpoint(card["checkpoint"])
    card["recipe"] = {**RECIPE, **dict(config_mod.parse_set(s) for s in sets),
                      "sources": {"real_photos(train)": len(photos)}}
    card["reproduce"] = ("python -m retrieval.training.default_model --output OUT_DIR "
                         + " ".join(f"--set {s}" for s in sets)).strip()
    card["train_seconds"] = round(time.monotonic() - t0, 1)
    summary = {k: card[k] for k in ("model_version", "data", "stages", "evaluation", "recipe",
                                    "reproduce", "train_seconds")}
    shipped = export_delta(trained, asset, head_seed=int(cfg["model.head_seed"]),
                           card={"trained_model_version": card["model_version"],
                                 "data": card["data"], "recipe": card["recipe"],
                                 "final_losses": {s: st.get("final_loss") for s, st in card["stages"].items()}})
    check = load_delta(asset)
    assert check.model_version() == shipped.model_version()
    card["shipped"] = {"asset": _display(asset), "bytes": os.path.getsize(asset) if os.path.exists(asset) else None,
                       "model_version": shipped.model_version(),
                       "note": "int8 per-row deltas from the ImageNet backbone + seed heads"}
    base = os.path.splitext(asset)[0]
    fsio.write_json(base + ".card.json", {**summary, "shipped": card["shipped"],
                                          "checkpoint": card["checkpoint"]})
    fsio.write_bytes(base + ".card.md", to_markdown({**card, "checkpoint": _display(asset),
                                                      "model_version": shipped.model_version()}).encode())
    return {"asset": asset, **card["shipped"], "train_seconds": card["train_seconds"],
            "final_losses": {s: st.get("final_loss") for s, st in card["stages"].items()},
            "evaluation": {k: {m: round(v, 4) for m, v in r.items() if isinstance(v, float)}
                           for k, r in (card.get("evaluation") or {}).get("models", {}).items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="working directory of the training run")
    p.add_argument("--asset", default=None, help="where to write the delta (default: the packaged asset path)")
    p.add_argument("--set", action="append", default=[], dest="sets")
    p.add_argument("--conf", action="append", default=[])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from retrieval.training.delta import DEFAULT_MODEL

    print(json.dumps(reproduce(args.output, args.asset or DEFAULT_MODEL, args.sets, args.conf), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
