"""Build the background images `retrieval run` ships (retrieval/assets/background/): 400 images from
the training sources (scripts/training_sources.sh; never a reserved evaluation package, never a
quality-benchmark package): first every everyday photograph (the packages of
`retrieval.train.sources.EVERYDAY_PACKAGES`), whole and, when it holds them, its non-overlapping
crops of at least CROP px a side (at most 2 x 2: unrelated-looking images of the same kind as
uploads), then textures and scenery taken round-robin across the other packages up to 400; each
resized to at most 224 px on its long side (the model's gallery resolution), JPEG quality 82.

    scripts/training_sources.sh && .venv/bin/python scripts/make_background.py [--dest DIR]

Writes the images and SOURCES.tsv (file, package, source path, source sha256); deterministic.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

from PIL import Image, ImageOps

from retrieval.recipes.default_model import crop_boxes
from retrieval.train.sources import EVERYDAY_PACKAGES, training_photos

COUNT, SIDE, QUALITY, CROP = 400, 224, 82, 320
DEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "retrieval", "assets", "background")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", default=DEST, help=f"output folder (default {DEST})")
    dest = ap.parse_args(argv).dest
    photos = training_photos()
    everyday = [p for p in photos if p.package in EVERYDAY_PACKAGES]
    chosen: list = []     # (photo, crop box or None)
    for p in everyday:
        with Image.open(p.path) as im:     # the crop boxes are in the upright (EXIF-rotated) frame
            w, h = ImageOps.exif_transpose(im).size
        boxes = crop_boxes(w, h, CROP)
        chosen += [(p, None)] + ([(p, b) for b in boxes] if len(boxes) > 1 else [])
    chosen = chosen[:COUNT]
    by_package: dict[str, list] = defaultdict(list)
    for p in photos:
        if p.package not in EVERYDAY_PACKAGES:
            by_package[p.package].append(p)
    while len(chosen) < COUNT and any(by_package.values()):
        for package in sorted(by_package):
            if by_package[package] and len(chosen) < COUNT:
                chosen.append((by_package[package].pop(0), None))
    os.makedirs(dest, exist_ok=True)
    rows = ["file\tpackage\tsource\tsource_sha256\tbox"]
    for i, (p, box) in enumerate(chosen):
        img = ImageOps.exif_transpose(Image.open(p.path)).convert("RGB")
        if box is not None:
            img = img.crop(box)
        img.thumbnail((SIDE, SIDE), Image.LANCZOS)
        name = f"bg_{i:04d}.jpg"
        img.save(os.path.join(dest, name), "JPEG", quality=QUALITY, optimize=True)
        rel = p.path.split(f"/{p.package}/", 1)[-1]
        rows.append(f"{name}\t{p.package}\t{rel}\t{p.sha256}\t{'' if box is None else 'x'.join(map(str, box))}")
    with open(os.path.join(dest, "SOURCES.tsv"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(rows) + "\n")
    n_everyday = sum(p.package in EVERYDAY_PACKAGES for p, _ in chosen)
    print(f"{len(chosen)} background images ({n_everyday} from {len(everyday)} everyday photos) -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
