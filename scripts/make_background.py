"""Build the background images `retrieval run` ships (retrieval/assets/background/): 400 photographs
from the training sources (scripts/training_sources.sh; never a reserved evaluation package, never a
quality-benchmark package), taken round-robin across the source packages, each resized to at most
224 px on its long side (the model's gallery resolution) and saved as JPEG quality 82.

    scripts/training_sources.sh && .venv/bin/python scripts/make_background.py

Writes the images and SOURCES.tsv (file, package, source path, source sha256); deterministic.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

from PIL import Image, ImageOps

from retrieval.train.sources import training_photos

COUNT, SIDE, QUALITY = 400, 224, 82
DEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "retrieval", "assets", "background")


def main() -> int:
    photos = training_photos()
    by_package: dict[str, list] = defaultdict(list)
    for p in photos:
        by_package[p.package].append(p)
    chosen = []
    while len(chosen) < COUNT and any(by_package.values()):
        for package in sorted(by_package):
            if by_package[package] and len(chosen) < COUNT:
                chosen.append(by_package[package].pop(0))
    os.makedirs(DEST, exist_ok=True)
    rows = ["file\tpackage\tsource\tsource_sha256"]
    for i, p in enumerate(chosen):
        img = ImageOps.exif_transpose(Image.open(p.path)).convert("RGB")
        img.thumbnail((SIDE, SIDE), Image.LANCZOS)
        name = f"bg_{i:04d}.jpg"
        img.save(os.path.join(DEST, name), "JPEG", quality=QUALITY, optimize=True)
        rel = p.path.split(f"/{p.package}/", 1)[-1]
        rows.append(f"{name}\t{p.package}\t{rel}\t{p.sha256}")
    with open(os.path.join(DEST, "SOURCES.tsv"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(rows) + "\n")
    print(f"{len(chosen)} background images -> {DEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
