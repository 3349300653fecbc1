"""Query regions (``extract.query_regions``; docs/search.md "Query regions").

A copy is often a part of the query: a photo shown inside a screenshot, a meme's frame, a padded
or letterboxed picture, a picture under stickers at its edges. ``retrieval extract --role query``
encodes the whole image and, per name in ``extract.query_regions``, zero or more regions of it,
each a crop of the decoded image (after EXIF orientation) encoded like a whole query:

- ``content``: the image's main detailed area, the rectangle of mostly-busy cells with the largest
  sum (:func:`content_box`), which trims flat (uniform or low-detail) surroundings - screenshot
  chrome, letterbox and pad bands, frames, meme bands - while sparse text stays out; no region when
  nothing is trimmed (the box covers >= ``CONTENT_MIN_TRIM`` of the image's area) or when what
  is left is under ``CONTENT_MIN_SIDE`` of a side;
- ``center<P>`` (``P`` in 30..95): the central crop of ``P`` percent of each side;
- ``grid<N>`` (``N`` in 2..4): ``N x N`` overlapping tiles, each ``2 / (N + 1)`` of a side.

A region's label (the feature rows' ``region`` column, the results' ``query_region``) is
``NAME:x0,y0,x1,y1``, the box in relative coordinates of the (EXIF-oriented) query image, three
decimals, e.g. ``content:0.120,0.300,0.880,0.750``; the whole image has no label (null).
"""
from __future__ import annotations

import re

import numpy as np
from PIL import Image

CONTENT_MIN_TRIM = 0.92     # content: no region when the box keeps >= this share of the area
CONTENT_MIN_SIDE = 0.25     # content: no region when the box is under this share of a side
_FLAT = 2.0                 # a pixel is flat when its 3x3 grey-level spread (max - min) is <= this (0..255)
_DETAIL = 0.5               # a cell counts for the content box when more than this share of it is busy
_CELL = 8                   # cell side (px at _PROFILE_SIDE)
_PROFILE_SIDE = 256         # the image is measured at this longer side

Box = tuple[float, float, float, float]
_NAME = re.compile(r"^(content|center(\d+)|grid(\d+))$")


def check_names(names) -> str | None:
    """The config check of ``extract.query_regions`` (None: valid)."""
    if not isinstance(names, (list, tuple)):
        return "must be a list of region names (content, center<P>, grid<N>)"
    for n in names:
        m = _NAME.match(str(n))
        if not m:
            return f"unknown region {n!r} (content, center<P> with P in 30..95, grid<N> with N in 2..4)"
        if m.group(2) and not 30 <= int(m.group(2)) <= 95:
            return f"{n}: P must be in 30..95"
        if m.group(3) and not 2 <= int(m.group(3)) <= 4:
            return f"{n}: N must be in 2..4"
    if len(set(map(str, names))) != len(names):
        return "names a region twice"
    return None


def label(name: str, box: Box) -> str:
    return f"{name}:" + ",".join(f"{v:.3f}" for v in box)


def parse_label(text: str | None) -> tuple[str, Box] | None:
    """``(name, box)`` of a region label; None for the whole image (null) or an unreadable label."""
    if not text or ":" not in text:
        return None
    name, _, coords = text.partition(":")
    try:
        x0, y0, x1, y1 = (float(v) for v in coords.split(","))
    except ValueError:
        return None
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        return None
    return name, (x0, y0, x1, y1)


def _max_rectangle(v: np.ndarray) -> tuple[int, int, int, int]:
    """The sub-rectangle of ``v`` (2-d) with the largest sum: ``(row0, row1, col0, col1)``, stops
    exclusive (Kadane over the columns, for every pair of rows at once)."""
    h, w = v.shape
    csum = np.vstack([np.zeros((1, w)), np.cumsum(v, axis=0)])
    tops, bottoms = np.triu_indices(h + 1, k=1)
    strips = csum[bottoms] - csum[tops]                 # one row per (top, bottom) pair
    best = np.full(len(strips), -np.inf)
    best_at = np.zeros((len(strips), 2), np.int64)
    run = np.zeros(len(strips))
    start = np.zeros(len(strips), np.int64)
    for c in range(w):
        restart = run <= 0
        run = np.where(restart, strips[:, c], run + strips[:, c])
        start = np.where(restart, c, start)
        better = run > best
        best = np.where(better, run, best)
        best_at[better] = np.stack([start[better], np.full(int(better.sum()), c + 1)], axis=1)
    i = int(np.argmax(best))
    return int(tops[i]), int(bottoms[i]), int(best_at[i, 0]), int(best_at[i, 1])


def content_box(img: Image.Image) -> Box | None:
    """The box (relative ``x0, y0, x1, y1``) of the image's main detailed area, or None (nothing to
    trim, or too little left). Measured at ``_PROFILE_SIDE`` px: a pixel is busy when its 3x3 grey
    spread exceeds ``_FLAT``; the image is cut into ``_CELL`` px cells, each worth its busy share
    minus ``_DETAIL``; the box is the rectangle of cells with the largest sum (a photo's cells are
    mostly busy, screenshot chrome, bands, pads and frames mostly flat, sparse text in between)."""
    w, h = img.size
    scale = _PROFILE_SIDE / max(w, h)
    small = img.convert("L").resize((max(_CELL * 4, round(w * scale)), max(_CELL * 4, round(h * scale))),
                                    Image.BILINEAR)
    g = np.asarray(small, dtype=np.int16)
    pad = np.pad(g, 1, mode="edge")
    shifts = [pad[1 + dy:1 + dy + g.shape[0], 1 + dx:1 + dx + g.shape[1]] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    busy = (np.max(shifts, axis=0) - np.min(shifts, axis=0)) > _FLAT
    ch, cw = busy.shape[0] // _CELL, busy.shape[1] // _CELL
    cells = busy[:ch * _CELL, :cw * _CELL].reshape(ch, _CELL, cw, _CELL).mean(axis=(1, 3))
    r0, r1, c0, c1 = _max_rectangle(cells - _DETAIL)
    hh, ww = busy.shape            # cells cover whole pixels: a box reaching the last cell reaches the edge
    box = (c0 * _CELL / ww, r0 * _CELL / hh, 1.0 if c1 == cw else c1 * _CELL / ww, 1.0 if r1 == ch else r1 * _CELL / hh)
    bw, bh = box[2] - box[0], box[3] - box[1]
    if bw * bh >= CONTENT_MIN_TRIM or bw < CONTENT_MIN_SIDE or bh < CONTENT_MIN_SIDE:
        return None
    return box


def boxes(img: Image.Image, names) -> list[tuple[str, Box]]:
    """The regions of ``img`` for the configured ``names``: ``[(label, box)]`` in config order."""
    out: list[tuple[str, Box]] = []
    for name in names:
        m = _NAME.match(str(name))
        if m is None:
            raise ValueError(f"extract.query_regions: unknown region {name!r}")
        if name == "content":
            box = content_box(img)
            if box is not None:
                out.append((label(name, box), box))
        elif m.group(2):
            p = int(m.group(2)) / 100.0
            box = ((1 - p) / 2, (1 - p) / 2, (1 + p) / 2, (1 + p) / 2)
            out.append((label(name, box), box))
        else:
            n = int(m.group(3))
            side = 2.0 / (n + 1)
            step = (1.0 - side) / (n - 1)
            for j in range(n):
                for i in range(n):
                    box = (i * step, j * step, i * step + side, j * step + side)
                    out.append((label(name, box), box))
    return out


def crop(img: Image.Image, box: Box) -> Image.Image:
    """The pixels of ``box`` (relative coordinates), at least one pixel each way."""
    w, h = img.size
    x0, y0 = int(round(box[0] * w)), int(round(box[1] * h))
    x1, y1 = max(x0 + 1, int(round(box[2] * w))), max(y0 + 1, int(round(box[3] * h)))
    return img.crop((x0, y0, min(x1, w), min(y1, h)))
