"""The bundled sample: real photos that ship with installed packages, and generated copies.

Sources (all offline): scikit-image's bundled photos and Debian ``opencv-doc``'s example images
(``/usr/share/doc/opencv-doc/examples/data``; calibration chessboards and non-photos excluded).
They are split deterministically by *scene* (``aloeL``/``aloeR`` share a scene) into ``train``
(training data for the model) and ``holdout`` (the sample gallery and every evaluation).

``make_sample(root)`` writes ``root/gallery/`` (holdout photos, mixed JPEG/PNG/WebP),
``root/queries/`` (for each gallery photo, copies made with crop, JPEG re-encoding, text overlay,
recolouring, small rotation, border, downscale; plus non-matching photos from the train split), and
``root/truth.csv`` (``query_id,gallery_id``; empty gallery_id = no true match), and
``root/background/`` (the other train-split photos, whole and in quadrants: unrelated images for
score normalisation, disjoint from the gallery and the queries).

    python -m retrieval.sample OUT_DIR
"""
from __future__ import annotations

import csv
import glob
import os
import random
import re
import sys
import zlib

from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"
SKIMAGE_PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "moon.png",
                  "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "ihc.png", "brick.png", "grass.png", "gravel.png", "cell.png",
                  "page.png", "text.png", "clock_motion.png", "microaneurysms.png")
OPENCV_EXCLUDE = re.compile(r"^(left|right)\d+\.|^(digits|chessboard|gradient|mask|ml|notes|pca_test1"
                            r"|opencv-logo.*|detect_blob|ellipses|cards|imageText.|alphabet.*)\.", re.I)


def _scene(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    stem = re.sub(r"(_?(left|right)|[lr]|_?\d+|[ab])$", "", stem)
    return stem or os.path.basename(path)


def real_photos(split: str = "all") -> list[str]:
    """Local paths of the offline real photos; ``split`` is ``train``, ``holdout`` or ``all``."""
    paths: list[str] = []
    try:
        import skimage.data

        base = os.path.dirname(skimage.data.__file__)
        paths += [os.path.join(base, n) for n in SKIMAGE_PHOTOS if os.path.exists(os.path.join(base, n))]
    except ImportError:
        pass
    if os.path.isdir(OPENCV_DATA):
        for p in sorted(glob.glob(os.path.join(OPENCV_DATA, "*"))):
            if p.lower().endswith((".jpg", ".png")) and not OPENCV_EXCLUDE.match(os.path.basename(p)):
                paths.append(p)
    if not paths:
        raise RuntimeError("no sample photos found: install scikit-image (pip) or opencv-doc (apt)")
    if split == "all":
        return paths
    if split not in ("train", "holdout"):
        raise ValueError(f"split must be train, holdout or all, not {split!r}")
    want = 0 if split == "holdout" else 1
    return [p for p in paths if zlib.crc32(_scene(p).encode()) % 2 == want]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _copy(img: Image.Image, rng: random.Random, ops: list[str]) -> Image.Image:
    w, h = img.size
    for op in ops:
        if op == "crop":
            fw, fh = rng.uniform(0.6, 0.9), rng.uniform(0.6, 0.9)
            cw, ch = int(w * fw), int(h * fh)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            img = img.crop((x, y, x + cw, y + ch))
        elif op == "text":
            img = img.copy()
            d = ImageDraw.Draw(img)
            size = max(12, img.size[1] // 10)
            for _ in range(2):
                d.text((rng.randint(0, img.size[0] // 2), rng.randint(0, img.size[1] - size)),
                       rng.choice(["COPY", "sale!", "@user_42", "#repost", "2026"]),
                       fill=tuple(rng.randint(0, 255) for _ in range(3)), font=_font(size))
            d.line([(rng.randint(0, img.size[0]), rng.randint(0, img.size[1])) for _ in range(2)],
                   fill=(255, 0, 0), width=max(2, img.size[0] // 100))
        elif op == "recolour":
            img = ImageEnhance.Color(img).enhance(rng.uniform(0.0, 1.8))
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
        elif op == "rotate":
            img = img.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR, expand=False, fillcolor=(0, 0, 0))
        elif op == "border":
            b = max(4, min(img.size) // 12)
            img = ImageOps.expand(img, border=b, fill=tuple(rng.randint(0, 255) for _ in range(3)))
        elif op == "downscale":
            s = rng.uniform(0.3, 0.6)
            img = img.resize((max(16, int(img.size[0] * s)), max(16, int(img.size[1] * s))), Image.BILINEAR)
    return img


COPY_RECIPES = [["crop", "jpeg"], ["text", "jpeg"], ["recolour"], ["crop", "text"], ["rotate", "recolour"],
                ["border", "downscale", "jpeg"], ["downscale", "text", "jpeg"], ["crop", "recolour", "jpeg"]]


def _background(out_dir: str, photos: list[str]) -> str:
    """Unrelated photos for score normalisation (``search.normalize.background``): the train-split
    photos that are not queries, whole and as their four non-overlapping quadrants."""
    os.makedirs(out_dir, exist_ok=True)
    for path in photos:
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        stem = os.path.splitext(os.path.basename(path))[0]
        w, h = img.size
        img.save(os.path.join(out_dir, f"{stem}.jpg"), "JPEG", quality=90)
        for k, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)]):
            if w >= 128 and h >= 128:
                img.crop((x, y, x + w // 2, y + h // 2)).save(os.path.join(out_dir, f"{stem}_q{k}.jpg"), "JPEG",
                                                              quality=90)
    return out_dir


def make_sample(root: str, seed: int = 0, copies_per_image: int = 2, n_distractors: int = 12,
                max_gallery: int | None = None) -> dict:
    """Write the sample gallery, queries and truth under ``root``; returns their paths and counts."""
    rng = random.Random(seed)
    gallery_dir, query_dir = os.path.join(root, "gallery"), os.path.join(root, "queries")
    os.makedirs(gallery_dir, exist_ok=True)
    os.makedirs(query_dir, exist_ok=True)
    photos = real_photos("holdout")[:max_gallery] if max_gallery else real_photos("holdout")
    truth: list[tuple[str, str]] = []
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    for i, path in enumerate(photos):
        img = Image.open(path)
        img = ImageOps.exif_transpose(img).convert("RGB")
        src = os.path.splitext(os.path.basename(path))[0]
        ext, fmt = formats[i % len(formats)]
        gallery_id = f"{src}.{ext}"
        img.save(os.path.join(gallery_dir, gallery_id), fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        for c in range(copies_per_image):
            recipe = COPY_RECIPES[(i * copies_per_image + c) % len(COPY_RECIPES)]
            copy = _copy(img, rng, [op for op in recipe if op != "jpeg"])
            qid = f"copy_{src}_{c}.jpg"
            copy.save(os.path.join(query_dir, qid), "JPEG",
                      quality=rng.randint(25, 60) if "jpeg" in recipe else 90)
            truth.append((qid, gallery_id))
    distractors = real_photos("train")
    rng.shuffle(distractors)
    for path in distractors[:n_distractors]:
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        qid = f"other_{os.path.splitext(os.path.basename(path))[0]}.jpg"
        img.save(os.path.join(query_dir, qid), "JPEG", quality=85)
        truth.append((qid, ""))
    background_dir = _background(os.path.join(root, "background"), distractors[n_distractors:])
    truth_csv = os.path.join(root, "truth.csv")
    with open(truth_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query_id", "gallery_id"])
        w.writerows(truth)
    return {"gallery": gallery_dir, "queries": query_dir, "truth": truth_csv, "background": background_dir,
            "n_gallery": len(photos), "n_queries": len(truth),
            "n_matching": sum(1 for _, g in truth if g)}


if __name__ == "__main__":  # pragma: no cover
    out = sys.argv[1] if len(sys.argv) > 1 else "sample_data"
    print(make_sample(out))
