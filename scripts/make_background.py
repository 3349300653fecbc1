"""Build the background images `retrieval run` ships (retrieval/assets/background/): 400 images from
the training sources (scripts/training_sources.sh; never a reserved evaluation package, never a
quality-benchmark package), each resized to at most 224 px on its long side (the model's gallery
resolution) and saved as JPEG quality 82. Deterministic.

Default (the shipped set): the photos of the shipped model's ten packages
(`retrieval.train.sources.DEFAULT_MODEL_PACKAGES`), taken round-robin across the packages.
`--everyday-first` (measured for issue 23, not shipped: docs/quality.md): every everyday photograph
of all training packages (`EVERYDAY_PACKAGES`, less NOT_A_PHOTO), whole and, when it holds them, its
non-overlapping crops of at least CROP px a side (at most 2 x 2), then the other packages
round-robin up to 400.

    scripts/training_sources.sh && .venv/bin/python scripts/make_background.py [--dest DIR] [--everyday-first]

Writes the images and SOURCES.tsv (file, package, source path, source sha256[, crop box]).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict

from PIL import Image, ImageOps

from retrieval.recipes.default_model import crop_boxes
from retrieval.train.sources import DEFAULT_MODEL_PACKAGES, EVERYDAY_PACKAGES, training_photos

COUNT, SIDE, QUALITY, CROP = 400, 224, 82, 320
# kept by the photo filter but not photographs of anything (colour test charts, application
# screenshots, a control-point editor): never in the background
NOT_A_PHOTO = re.compile(r"(wide-gamut-tests/|/doc/HTML/[^/]+/kalzium/|Celeste_cpeditor)")
DEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "retrieval", "assets", "background")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", default=DEST, help=f"output folder (default {DEST})")
    ap.add_argument("--everyday-first", action="store_true", help="everyday photos and their crops first")
    args = ap.parse_args(argv)
    dest = args.dest
    if args.everyday_first:
        photos = [p for p in training_photos() if not NOT_A_PHOTO.search(p.path)]
    else:
        photos = training_photos(packages=DEFAULT_MODEL_PACKAGES)
    everyday = [p for p in photos if args.everyday_first and p.package in EVERYDAY_PACKAGES]
    chosen: list = []     # (photo, crop box or None)
    for p in everyday:
        with Image.open(p.path) as im:     # the crop boxes are in the upright (EXIF-rotated) frame
            w, h = ImageOps.exif_transpose(im).size
        boxes = crop_boxes(w, h, CROP)
        chosen += [(p, None)] + ([(p, b) for b in boxes] if len(boxes) > 1 else [])
    chosen = chosen[:COUNT]
    by_package: dict[str, list] = defaultdict(list)
    for p in photos:
        if not (args.everyday_first and p.package in EVERYDAY_PACKAGES):
            by_package[p.package].append(p)
    while len(chosen) < COUNT and any(by_package.values()):
        for package in sorted(by_package):
            if by_package[package] and len(chosen) < COUNT:
                chosen.append((by_package[package].pop(0), None))
    os.makedirs(dest, exist_ok=True)
    rows = ["file\tpackage\tsource\tsource_sha256" + ("\tbox" if args.everyday_first else "")]
    for i, (p, box) in enumerate(chosen):
        img = ImageOps.exif_transpose(Image.open(p.path)).convert("RGB")
        if box is not None:
            img = img.crop(box)
        img.thumbnail((SIDE, SIDE), Image.LANCZOS)
        name = f"bg_{i:04d}.jpg"
        img.save(os.path.join(dest, name), "JPEG", quality=QUALITY, optimize=True)
        rel = p.path.split(f"/{p.package}/", 1)[-1]
        row = f"{name}\t{p.package}\t{rel}\t{p.sha256}"
        rows.append(row + (f"\t{'' if box is None else 'x'.join(map(str, box))}" if args.everyday_first else ""))
    with open(os.path.join(dest, "SOURCES.tsv"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(rows) + "\n")
    n_everyday = sum(p.package in EVERYDAY_PACKAGES for p, _ in chosen)
    extra = f" ({n_everyday} from {len(everyday)} everyday photos)" if args.everyday_first else ""
    print(f"{len(chosen)} background images{extra} -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
