"""Copy-detection augmentations: what an uploader does to a picture before re-posting it.

:func:`augment` takes an RGB PIL image and a numpy ``Generator`` and returns a new RGB PIL image
(never smaller than 8 px a side). Each operation in ``ops`` fires with its probability in
:data:`PROBABILITY` (or always, with ``always=True``); ``strength`` in [0, 1] scales every
magnitude (0 = identity). Operations run in a fixed order: geometry (crop, scale, shift, rotate,
flip), colour (color, grayscale), overlays (text, lines, overlay), degradations (blur, noise, jpeg).
All randomness comes from the generator, so a view is a pure function of its seed.
"""
from __future__ import annotations

import io
import string
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

OPS = ("crop", "scale", "shift", "rotate", "flip", "color", "grayscale", "text", "lines", "overlay",
       "blur", "noise", "jpeg")
PROBABILITY = {"crop": 0.8, "scale": 0.25, "shift": 0.3, "rotate": 0.3, "flip": 0.5, "color": 0.7,
               "grayscale": 0.15, "text": 0.3, "lines": 0.25, "overlay": 0.25, "blur": 0.25,
               "noise": 0.25, "jpeg": 0.5}
MIN_SIDE = 8
_WORDS = ("COPY", "sale", "#repost", "@user", "2026", "meme", "lol", "HD", "free", "www")


def check_ops(ops: Iterable[str]) -> tuple[str, ...]:
    ops = tuple(ops)
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; choose from {', '.join(OPS)}")
    return ops


def _fill(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(6, size))
    except TypeError:  # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


def _crop(img: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
    w, h = img.size
    area = rng.uniform(1.0 - 0.75 * s, 1.0)
    ratio = float(np.exp(rng.uniform(-0.4 * s, 0.4 * s)))
    cw = int(round(min(w, max(MIN_SIDE, w * np.sqrt(area * ratio)))))
    ch = int(round(min(h, max(MIN_SIDE, h * np.sqrt(area / ratio)))))
    cw, ch = min(cw, w), min(ch, h)
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def _scale(img: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
    """Zoom out: the picture shrunk onto a plain canvas of the original size (a border/frame)."""
    w, h = img.size
    f = rng.uniform(1.0 - 0.5 * s, 1.0)
    nw, nh = max(MIN_SIDE, int(w * f)), max(MIN_SIDE, int(h * f))
    canvas = Image.new("RGB", (w, h), _fill(rng))
    canvas.paste(img.resize((nw, nh), Image.BILINEAR),
                 (int(rng.integers(0, w - nw + 1)), int(rng.integers(0, h - nh + 1))))
    return canvas


def _shift(img: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
    w, h = img.size
    dx = rng.uniform(-0.2, 0.2) * s * w
    dy = rng.uniform(-0.2, 0.2) * s * h
    return img.transform((w, h), Image.AFFINE, (1, 0, dx, 0, 1, dy), resample=Image.BILINEAR,
                         fillcolor=_fill(rng))


def _color(img: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - 0.6 * s, 1 + 0.6 * s))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - 0.6 * s, 1 + 0.6 * s))
    img = ImageEnhance.Color(img).enhance(max(0.0, rng.uniform(1 - s, 1 + s)))
    shift = int(round(rng.uniform(-0.1, 0.1) * s * 255))
    if shift:
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
        img = Image.fromarray(hsv, "HSV").convert("RGB")
    return img


def _text(img: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
    img = img.copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(int(rng.integers(1, 2 + int(3 * s)))):
        size = max(6, int(h * rng.uniform(0.05, 0.05 + 0.15 * s)))
        if rng.random() < 0.5:
            word = str(rng.choice(_WORDS))
        else:
            word = "".join(rng.choice(list(string.ascii_letters + string.digits), size=int(rng.integers(3, 12))))
        d.text((int(rng.integers(0, max(1, w - size))), int(rng.integers(0, max(1, h - size)))), word,
               fill=_fill(rng), font=_font(size))
    return img


def _lines(img: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
    img = img.copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(int(rng.integers(1, 2 + int(4 * s)))):
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(2, 5)))]
        d.line(pts, fill=_fill(rng), width=max(1, int(min(w, h) * rng.uniform(0.005, 0.005 + 0.03 * s))))
    return img


def _overlay(img: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
    """Paste a patch (a sticker: a flat shape, a colour gradient, or a piece of the image turned)."""
    w, h = img.size
    pw = max(2, int(w * rng.uniform(0.1, 0.1 + 0.3 * s)))
    ph = max(2, int(h * rng.uniform(0.1, 0.1 + 0.3 * s)))
    kind = int(rng.integers(0, 3))
    if kind == 0:
        patch = Image.new("RGB", (pw, ph), _fill(rng))
        ImageDraw.Draw(patch).ellipse((0, 0, pw - 1, ph - 1), fill=_fill(rng))
    elif kind == 1:
        a, b = np.array(_fill(rng), np.float32), np.array(_fill(rng), np.float32)
        t = np.linspace(0.0, 1.0, pw, dtype=np.float32)[None, :, None]
        patch = Image.fromarray(np.broadcast_to(a + (b - a) * t, (ph, pw, 3)).astype(np.uint8), "RGB")
    else:
        x, y = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
        patch = img.crop((x, y, x + pw, y + ph)).transpose(Image.Transpose.ROTATE_180)
    img = img.copy()
    img.paste(patch, (int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))))
    return img


def _blur(img: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
    radius = rng.uniform(0.3, 0.3 + 2.5 * s) * min(img.size) / 256.0
    return img.filter(ImageFilter.GaussianBlur(radius=max(0.1, radius)))


def _noise(img: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(2.0, 2.0 + 25.0 * s), size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def _jpeg(img: Image.Image, rng: np.random.Generator, s: float) -> Image.Image:
    quality = int(rng.integers(max(5, int(95 - 85 * s)), 96))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    with Image.open(io.BytesIO(buf.getvalue())) as out:
        return out.convert("RGB")


_FUNCS = {
    "crop": _crop, "scale": _scale, "shift": _shift,
    "rotate": lambda img, rng, s: img.rotate(rng.uniform(-45 * s, 45 * s), resample=Image.BILINEAR,
                                             expand=False, fillcolor=_fill(rng)),
    "flip": lambda img, rng, s: ImageOps.mirror(img),
    "color": _color,
    "grayscale": lambda img, rng, s: ImageOps.grayscale(img).convert("RGB"),
    "text": _text, "lines": _lines, "overlay": _overlay, "blur": _blur, "noise": _noise, "jpeg": _jpeg,
}


def augment(img: Image.Image, rng: np.random.Generator, strength: float = 0.5,
            ops: Iterable[str] = OPS, always: bool = False) -> Image.Image:
    """One random augmentation of ``img`` (RGB); see the module doc."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    chosen = set(check_ops(ops))
    img = img.convert("RGB") if img.mode != "RGB" else img
    if strength == 0.0:
        return img.copy()
    for op in OPS:  # fixed order; the firing draw happens for every op, chosen or not
        fire = rng.random() < PROBABILITY[op]
        if op in chosen and (always or fire):
            img = _FUNCS[op](img, rng, strength)
    if min(img.size) < MIN_SIDE:
        img = img.resize((max(MIN_SIDE, img.size[0]), max(MIN_SIDE, img.size[1])), Image.BILINEAR)
    return img
