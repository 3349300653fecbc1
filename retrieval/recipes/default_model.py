"""Reproduce the shipped default model (``retrieval/assets/default_model.npz``).

    bash scripts/training_sources.sh                     # the Debian photo packages (once; root)
    python -m retrieval.recipes.default_model --output /tmp/default-model-run \
        [--asset retrieval/assets/default_model.npz] [--max-images N] [--set train.seed=0 ...]
    python -m retrieval.recipes.default_model --schedule finetune --packages all ...   # from the default

1. lists the real photographs of the training packages (:mod:`retrieval.train.sources`: Debian
   packages disjoint from every evaluation set; wallpaper / background packages and Tux Paint are
   reserved for independent evaluation and never read), cuts each large photo into non-overlapping
   crops (distinct training images: hard negatives of each other) and writes them with a manifest
   whose sources, counts and sha256 go into the model card;
2. runs the training job (the same library code as ``retrieval train``) with :data:`RECIPE` on top
   of the defaults, from the ImageNet MobileNetV2 backbone and the seed-0 heads: stage 1 trains the
   last :data:`RECIPE` ``backbone_blocks`` blocks of the backbone (InfoNCE + KoLeo on AugLy views),
   stage 2 the heads, stage 3 the query adapter;
3. post-processes like ``retrieval fit`` (whitening learned on the training images' features);
4. exports the result as a compact delta (:mod:`retrieval.model.delta`) to ``--asset`` and
   writes the model card beside it (``default_model.card.json`` / ``.md``).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import sys
import time
from typing import Sequence

from retrieval import config as config_mod
from retrieval import fsio

log = logging.getLogger(__name__)

# the settings of the shipped model (on top of retrieval/conf/defaults.yaml)
RECIPE: dict = {
    "model.checkpoint": "",          # start from the ImageNet backbone + seed heads, whatever the default
    "train.stages": [1, 2, 3],
    "train.seed": 0,
    "train.batch_size": 64,
    "train.temperature": 0.05,
    "train.koleo": 0.1,
    "train.cache_views": 6,
    "train.augment_strength": 0.6,
    "train.backbone_blocks": 8,      # the last 8 of 19 blocks: 1.98M of the backbone's 2.22M parameters
    "train.stage1.steps": 1200,
    "train.stage1.lr": 0.0001,
    "train.stage2.steps": 400,
    "train.stage2.lr": 0.001,
    "train.stage3.steps": 400,
    "train.stage3.lr": 0.0001,
    "train.checkpoint_every": 200,
    "train.eval_copies": 2,
}
# ``--schedule finetune``: a short fine-tune that starts from the shipped default instead (issue 23):
# fewer cached views and images, a quarter of the steps at lower learning rates (on top of RECIPE)
FINETUNE: dict = {
    "model.checkpoint": "default",
    "train.cache_views": 3,
    "train.stage1.steps": 150,
    "train.stage1.lr": 0.00003,
    "train.stage2.steps": 100,
    "train.stage2.lr": 0.0003,
    "train.stage3.steps": 100,
    "train.stage3.lr": 0.00003,
    "train.checkpoint_every": 50,
}
FINETUNE_MAX_IMAGES = 1200
CROP_MIN = 320      # a photo whose sides hold two of these is cut into non-overlapping crops (at most 2 x 2)
MAX_IMAGES = 2400   # training images (photos and crops), spread evenly over the packages


def crop_boxes(width: int, height: int, crop_min: int = CROP_MIN) -> list[tuple[int, int, int, int]]:
    """Non-overlapping crops of a ``width`` x ``height`` photo: a grid of at most 2 x 2 cells, each
    at least ``crop_min`` px a side (the whole photo when it is too small to cut)."""
    nx = 2 if width >= 2 * crop_min else 1
    ny = 2 if height >= 2 * crop_min else 1
    xs = [round(width * k / nx) for k in range(nx + 1)]
    ys = [round(height * k / ny) for k in range(ny + 1)]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(ny) for i in range(nx)]


def training_images(out_dir: str, max_images: int = MAX_IMAGES, root: str | None = None,
                    packages: Sequence[str] | None = None) -> dict:
    """Write the training images (photos and their crops, JPEG q92, longer side <= 512) into
    ``out_dir/images`` and ``out_dir/train_images.csv`` (``image_id,uri,package,source_sha256,box``);
    returns the data section of the model card. ``packages``: the source packages (default
    ``sources.TRAINING_PACKAGES``; the recipe passes ``DEFAULT_MODEL_PACKAGES`` unless told ``all``)."""
    from PIL import Image

    from retrieval.train import sources

    photos = sources.training_photos(root, packages=packages)
    if not photos:
        raise RuntimeError("no training photos found: run scripts/training_sources.sh first")
    items = [(p, box) for p in photos for box in crop_boxes(p.width, p.height)]
    if len(items) > max_images:   # spread evenly over the sorted list (every package keeps its share)
        step = len(items) / max_images
        items = [items[int(k * step)] for k in range(max_images)]
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    manifest = os.path.join(out_dir, "train_images.csv")
    written = {}    # an earlier run's files are reused only for the same source photo and crop box
    if os.path.exists(manifest):
        with open(manifest, newline="") as fh:
            written = {r["image_id"]: (r["source_sha256"], r["box"]) for r in csv.DictReader(fh)}
    rows, per_package = [], {}
    for n, (photo, box) in enumerate(items):
        image_id = f"{photo.package}-{n:05d}.jpg"
        path = os.path.join(img_dir, image_id)
        if written.get(image_id) != (photo.sha256, "x".join(map(str, box))) or not os.path.exists(path):
            with Image.open(photo.path) as im:
                crop = im.convert("RGB").crop(box)
                crop.thumbnail((512, 512), Image.BILINEAR)
                crop.save(path + ".tmp", "JPEG", quality=92)
            os.replace(path + ".tmp", path)
        rows.append([image_id, path, photo.package, photo.sha256, "x".join(map(str, box))])
        per_package[photo.package] = per_package.get(photo.package, 0) + 1
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "uri", "package", "source_sha256", "box"])
        w.writerows(rows)
    listing = "\n".join(f"{r[2]}\t{r[3]}\t{r[4]}" for r in rows)
    summary = sources.summary(photos)
    root = root or sources.SOURCES_DIR
    versions = {}
    for pkg in summary["packages"]:
        stamp = os.path.join(root, pkg, ".unpacked")
        versions[pkg] = open(stamp).read().strip() if os.path.exists(stamp) else None
    return {"manifest": manifest, "images": len(rows), "source_photos": len({r[3] for r in rows}),
            "photos_listed": summary["total"], "photos_sha256": summary["sha256"], "per_package": per_package,
            "package_versions": versions,
            "training_list_sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "crop_min": CROP_MIN, "max_images": max_images,
            "excluded": "wallpaper / background packages and tuxpaint (reserved for independent evaluation); "
                        "the packages of the quality benchmark (tests/bench/quality_data.py)"}


def recipe_settings(schedule: str = "full") -> dict:
    """The recipe's settings for ``schedule``: ``full`` (the shipped model's, from ImageNet) or
    ``finetune`` (:data:`FINETUNE` on top: from the shipped default, a short schedule)."""
    if schedule not in ("full", "finetune"):
        raise ValueError(f"unknown schedule {schedule!r} (full or finetune)")
    return {**RECIPE, **(FINETUNE if schedule == "finetune" else {})}


def recipe_sets(schedule: str = "full") -> list[str]:
    """:func:`recipe_settings` as ``--set`` items (floats written positionally: YAML reads ``3e-05``
    as a string)."""
    def text(v):
        return format(v, ".12f").rstrip("0") if isinstance(v, float) else json.dumps(v)
    return [f"{k}={text(v)}" for k, v in recipe_settings(schedule).items()]


def default_max_images(schedule: str = "full") -> int:
    """The training images a schedule uses unless ``--max-images`` says otherwise."""
    return FINETUNE_MAX_IMAGES if schedule == "finetune" else MAX_IMAGES


def reproduce_command(schedule: str, max_images: int, packages: str, sets: Sequence[str]) -> str:
    """The model card's command line that rebuilds the model (only the options that differ)."""
    return ("bash scripts/training_sources.sh && python -m retrieval.recipes.default_model --output OUT_DIR "
            + (f"--schedule {schedule} " if schedule != "full" else "")
            + (f"--max-images {max_images} " if max_images != default_max_images(schedule) else "")
            + (f"--packages {packages} " if packages != "shipped" else "")
            + " ".join(f"--set {s}" for s in sets)).strip()


def write_manifest(paths: list[str], url: str) -> str:
    """A CSV manifest (``image_id,uri``); ids are base names."""
    with fsio.atomic_open(url, "w") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "uri"])
        for p in paths:
            w.writerow([os.path.basename(p), p])
    return url


def data_markdown(data: dict) -> str:
    """The model card's training-data section (sources, counts, versions, the list's sha256)."""
    lines = ["", "## Training data", "",
             f"{data['images']:,} training images: {data['source_photos']:,} photographs of "
             f"{data['photos_listed']:,} accepted by `retrieval.train.sources` (whole, or cut into "
             f"non-overlapping crops of at least {data['crop_min']} px; at most {data['max_images']:,} images, "
             "spread evenly). Excluded: " + data["excluded"] + ".", "",
             "| package | version | images |", "|---|---|---:|"]
    for pkg, n in sorted(data["per_package"].items()):
        lines.append(f"| {pkg} | {data['package_versions'].get(pkg) or '-'} | {n:,} |")
    lines += ["", f"- sha256 of the training list (package, source sha256, crop box per image): "
                  f"`{data['training_list_sha256']}`",
              f"- sha256 of the accepted photographs' sha256s: `{data['photos_sha256']}`", ""]
    return "\n".join(lines)


def fit_markdown(fit_card: dict) -> str:
    """The model card's post-processing line (``retrieval fit`` on the training images)."""
    f = fit_card["facts"]
    a2 = f["adapter2"]
    return ("\n## Post-processing\n\n"
            f"`retrieval fit` on the {fit_card['images_used']:,} training images: whitening of the fine and the "
            f"coarse codes (shrinkage {fit_card['shrinkage']}, power {fit_card['power']}); adapter-2 re-fit "
            f"{'kept' if a2['cosine_after'] > a2['cosine_before'] else 'not kept (no held-out gain)'} "
            f"(held-out cosine {a2['cosine_before']} -> {a2['cosine_after']}); fitted model_version "
            f"`{fit_card['model_version']}`, shipped as the int8 delta above.\n")


def _display(path: str) -> str:
    """The asset path relative to the repository when it lies inside it (cards are committed)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    full = os.path.abspath(path)
    return os.path.relpath(full, repo) if full.startswith(repo + os.sep) else path


def reproduce(output: str, asset: str, sets: list[str] = (), conf: list[str] = (),
              max_images: int | None = None, packages: str = "shipped", schedule: str = "full") -> dict:
    from retrieval.fit.job import fit
    from retrieval.model.checkpoints import load_checkpoint
    from retrieval.model.delta import export_delta, load_delta
    from retrieval.sample import real_photos
    from retrieval.train.card import to_markdown
    from retrieval.train.trainer import TrainJob, run_training

    t0 = time.monotonic()
    recipe = recipe_settings(schedule)
    max_images = default_max_images(schedule) if max_images is None else max_images
    from retrieval.train.sources import DEFAULT_MODEL_PACKAGES, TRAINING_PACKAGES

    pkgs = DEFAULT_MODEL_PACKAGES if packages == "shipped" else TRAINING_PACKAGES
    data = training_images(os.path.join(output, "data"), max_images, packages=pkgs)
    # the model card's own small evaluation (never trained on)
    holdout = write_manifest(real_photos("holdout"), fsio.join(output, "holdout_photos.csv"))
    # the recipe first, then the caller's --set items (which win), then the held-out input
    settings = recipe_sets(schedule)
    cfg = config_mod.load(conf, [*settings, *sets], {"train.eval_input": holdout})
    job = TrainJob.from_config(data["manifest"], fsio.join(output, "run"), cfg)
    card = run_training(job)
    t_train = time.monotonic() - t0
    # post-processing as `retrieval fit` does it: whitening (and the adapter-2 re-fit) learned on the
    # training images' own features
    fitted_url = fsio.join(output, "fitted.pt")
    fit_card = fit(data["manifest"], fitted_url,
                   config_mod.load(conf, [*sets, f"model.checkpoint={card['checkpoint']}"]))
    trained = load_checkpoint(fitted_url)
    card["recipe"] = {**recipe, **dict(config_mod.parse_set(s) for s in sets),
                      "fit": {k: fit_card[k] for k in ("shrinkage", "power", "images_used")}}
    card["data"] = {**card["data"], "training_set": data}
    card["reproduce"] = reproduce_command(schedule, max_images, packages, sets)
    card["train_seconds"] = round(t_train, 1)
    card["total_seconds"] = round(time.monotonic() - t0, 1)
    summary = {k: card[k] for k in ("model_version", "data", "stages", "evaluation", "recipe",
                                    "reproduce", "train_seconds", "total_seconds")}
    shipped = export_delta(trained, asset, head_seed=int(cfg["model.head_seed"]),
                           card={"trained_model_version": card["model_version"],
                                 "fitted_model_version": fit_card["model_version"],
                                 "data": {"images": data["images"], "per_package": data["per_package"],
                                          "training_list_sha256": data["training_list_sha256"]},
                                 "recipe": card["recipe"],
                                 "final_losses": {s: st.get("final_loss") for s, st in card["stages"].items()}})
    check = load_delta(asset)
    assert check.model_version() == shipped.model_version()
    card["shipped"] = {"asset": _display(asset), "bytes": os.path.getsize(asset) if os.path.exists(asset) else None,
                       "model_version": shipped.model_version(),
                       "note": "int8 per-row deltas from the ImageNet backbone + seed heads"}
    base = os.path.splitext(asset)[0]
    fsio.write_json(base + ".card.json", {**summary, "shipped": card["shipped"],
                                          "checkpoint": card["checkpoint"]})
    fsio.write_bytes(base + ".card.md", (to_markdown({**card, "checkpoint": _display(asset),
                                                       "model_version": shipped.model_version()})
                                          + fit_markdown(fit_card) + data_markdown(data)).encode())
    return {"asset": asset, **card["shipped"], "train_seconds": card["train_seconds"],
            "total_seconds": card["total_seconds"],
            "final_losses": {s: st.get("final_loss") for s, st in card["stages"].items()},
            "evaluation": {k: {m: round(v, 4) for m, v in r.items() if isinstance(v, float)}
                           for k, r in (card.get("evaluation") or {}).get("models", {}).items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="working directory of the training run")
    p.add_argument("--asset", default=None, help="where to write the delta (default: the packaged asset path)")
    p.add_argument("--max-images", type=int, default=None,
                   help=f"training images (photos and crops; default {MAX_IMAGES:,}, {FINETUNE_MAX_IMAGES:,} "
                        "with --schedule finetune)")
    p.add_argument("--schedule", choices=("full", "finetune"), default="full",
                   help="full: the shipped model's recipe from ImageNet (default); finetune: a short schedule "
                        "from the shipped default model (FINETUNE)")
    p.add_argument("--packages", choices=("shipped", "all"), default="shipped",
                   help="source packages: those of the shipped model (default) or every training package")
    p.add_argument("--set", action="append", default=[], dest="sets")
    p.add_argument("--conf", action="append", default=[])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from retrieval.model.delta import DEFAULT_MODEL

    print(json.dumps(reproduce(args.output, args.asset or DEFAULT_MODEL, args.sets, args.conf, args.max_images,
                                args.packages, args.schedule), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
