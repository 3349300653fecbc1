"""Copy-detection augmentations: what an uploader does to a picture before re-posting it.

The edits are AugLy's (``augly==1.0.0``, Meta's augmentation library of the 2021 Image Similarity
Challenge, with its bundled fonts, emoji and screenshot templates) and torchvision's; this module
only draws their parameters from a numpy ``Generator`` and keeps what neither library has working:
``perspective`` (AugLy's ``perspective_transform`` uses the removed ``np.float``: torchvision's
``perspective``), ``meme`` (AugLy's ``meme_format`` calls a Pillow API removed in Pillow 10: the same
caption band drawn with AugLy's meme font), ``rotate90`` and ``mixup``.

Three edits use ANOTHER training image (``other``: a callable ``rng -> PIL image``), as SSCD's
training does: ``overlay_image`` (cut-paste: a piece of another image pasted over this one),
``onto_image`` (this image pasted onto another) and ``mixup`` (a blend; this image keeps weight
>= 0.6, so the view stays this image's positive). Without ``other`` they are skipped.

:func:`augment` takes an RGB PIL image and returns a new RGB PIL image (never smaller than
:data:`MIN_SIDE` px a side). Each operation in ``ops`` fires with its probability in
:data:`PROBABILITY` (or always, with ``always=True``); at most one framing edit (:data:`FRAMES`) fires
per view. ``strength`` in [0, 1] scales every magnitude (0 = identity). Operations run in the fixed
order of :data:`OPS`: geometry, pixels, overlays, framing, encoding. All randomness comes from the
generator (AugLy gets every parameter, its noise seed included), so a view is a pure function of its
seed. Overlays and frames need an image of at least :data:`MIN_EDIT_SIDE` px a side and are skipped
on smaller ones.
"""
from __future__ import annotations

import glob
import os
import pickletools
from functools import lru_cache
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OPS = ("crop", "squash", "rotate", "rotate90", "flip", "vflip", "perspective", "scale",
       "color", "grayscale", "blur", "noise", "pixelization", "sharpen",
       "text", "emoji", "stripes", "overlay_image",
       "pad", "meme", "screenshot", "onto_image", "mixup",
       "jpeg")
PROBABILITY = {"crop": 0.6, "squash": 0.1, "rotate": 0.15, "rotate90": 0.05, "flip": 0.4, "vflip": 0.05,
               "perspective": 0.1, "scale": 0.2, "color": 0.5, "grayscale": 0.1, "blur": 0.2, "noise": 0.15,
               "pixelization": 0.08, "sharpen": 0.08, "text": 0.25, "emoji": 0.2, "stripes": 0.08,
               "overlay_image": 0.15, "pad": 0.1, "meme": 0.06, "screenshot": 0.06, "onto_image": 0.1,
               "mixup": 0.1, "jpeg": 0.5}
FRAMES = ("pad", "meme", "screenshot", "onto_image")
USES_OTHER = ("overlay_image", "onto_image", "mixup")
MIN_SIDE = 8
MIN_EDIT_SIDE = 32
_WORDS = ("lol", "wow", "repost", "follow me", "#tbt", "sale 50%", "hello", "my cat", "travel", "news",
          "photo by", "like & share", "top 10", "vibes", "summer", "2026", "HD", "free", "www", "meme")

Other = Callable[[np.random.Generator], Image.Image]


def check_ops(ops: Iterable[str]) -> tuple[str, ...]:
    ops = tuple(ops)
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; choose from {', '.join(OPS)}")
    return ops


@lru_cache(maxsize=1)
def _augly():
    try:
        import augly.image as imaugs
        import augly.utils as au
    except ImportError as exc:  # pragma: no cover - the train / test extras install it
        raise ImportError("training augmentations need AugLy: pip install 'augly==1.0.0' "
                          f"(the project's train extra) [{exc}]") from None
    return imaugs, au


_INT_OPS = {"BININT", "BININT1", "BININT2"}
_LIST_OPS = {"PROTO", "FRAME", "EMPTY_LIST", "MARK", "APPENDS", "APPEND", "BINPUT", "LONG_BINPUT", "MEMOIZE", "STOP"}


def pickled_int_list(data: bytes) -> list[int]:
    """The integers of a pickled flat list of ints (AugLy's font character tables), read by walking
    the pickle's opcodes WITHOUT unpickling (nothing is executed, no class is looked up); anything
    but a plain list of ints is refused."""
    out = []
    for op, arg, _ in pickletools.genops(data):
        if op.name in _INT_OPS:
            out.append(int(arg))
        elif op.name not in _LIST_OPS:
            raise ValueError(f"not a pickled list of ints (opcode {op.name})")
    return out


@lru_cache(maxsize=1)
def _fonts() -> tuple[tuple[str, tuple[int, ...]], ...]:
    """AugLy's bundled fonts that can write plain lower-case words (with their character tables:
    ``overlay_text`` takes indices into them)."""
    _, au = _augly()
    out = []
    for ttf in sorted(glob.glob(os.path.join(au.FONTS_DIR, "*.ttf"))):
        pkl = os.path.splitext(ttf)[0] + ".pkl"
        if "picto" in ttf.lower() or not os.path.exists(pkl):
            continue
        with open(pkl, "rb") as fh:
            chars = tuple(pickled_int_list(fh.read()))
        if all(ord(c) in chars for c in "abcdefghijklmnopqrstuvwxyz0123456789 #&%"):
            out.append((ttf, chars))
    return tuple(out)


@lru_cache(maxsize=1)
def _emojis() -> tuple[str, ...]:
    return tuple(sorted(glob.glob(os.path.join(_augly()[1].EMOJI_DIR, "*", "*.png"))))


def _fill(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def _crop(img, rng, s, other):
    area = rng.uniform(1.0 - 0.8 * s, 1.0)
    ratio = float(np.exp(rng.uniform(-0.4 * s, 0.4 * s)))
    fw, fh = min(1.0, np.sqrt(area * ratio)), min(1.0, np.sqrt(area / ratio))
    x0, y0 = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
    return _augly()[0].crop(img, x1=x0, y1=y0, x2=x0 + fw, y2=y0 + fh)


def _squash(img, rng, s, other):
    ratio = img.size[0] / img.size[1] * float(np.exp(rng.uniform(-0.7, 0.7) * s))
    return _augly()[0].change_aspect_ratio(img, ratio=ratio)


def _rotate(img, rng, s, other):
    return _augly()[0].rotate(img, degrees=float(rng.uniform(-40, 40) * s))


def _rotate90(img, rng, s, other):
    turns = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
    return img.transpose(turns[int(rng.integers(3))])


def _perspective(img, rng, s, other):
    from torchvision.transforms import functional as tvf

    w, h = img.size
    d = 0.2 * s
    start = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]
    end = [[int(x + rng.uniform(-d, d) * w), int(y + rng.uniform(-d, d) * h)] for x, y in start]
    return tvf.perspective(img, start, end, fill=list(_fill(rng)))


def _scale(img, rng, s, other):
    factor = float(rng.uniform(1.0 - 0.7 * s, 1.0))
    factor = max(factor, MIN_SIDE / min(img.size))
    return _augly()[0].scale(img, factor=factor)


def _color(img, rng, s, other):
    return _augly()[0].color_jitter(img, brightness_factor=float(rng.uniform(1 - 0.5 * s, 1 + 0.6 * s)),
                                    contrast_factor=float(rng.uniform(1 - 0.5 * s, 1 + 0.7 * s)),
                                    saturation_factor=float(rng.uniform(1 - 0.9 * s, 1 + 1.5 * s)))


def _blur(img, rng, s, other):
    return _augly()[0].blur(img, radius=max(0.6, float(rng.uniform(0.3, 0.3 + 4.0 * s) * max(img.size) / 600)))


def _noise(img, rng, s, other):
    return _augly()[0].random_noise(img, mean=0.0, var=float(rng.uniform(0.001, 0.001 + 0.04 * s)),
                                    seed=int(rng.integers(2 ** 31)))


def _pixelization(img, rng, s, other):
    return _augly()[0].pixelization(img, ratio=float(rng.uniform(1.0 - 0.8 * s, 1.0 - 0.3 * s)))


def _sharpen(img, rng, s, other):
    return _augly()[0].sharpen(img, factor=float(rng.uniform(1.5, 1.5 + 14 * s)))


def _text(img, rng, s, other):
    fonts = _fonts()
    font, chars = fonts[int(rng.integers(len(fonts)))]
    lines = [str(_WORDS[int(rng.integers(len(_WORDS)))]) for _ in range(int(rng.integers(1, 2 + int(2 * s))))]
    return _augly()[0].overlay_text(img, text=[[chars.index(ord(c)) for c in w] for w in lines], font_file=font,
                                    font_size=float(rng.uniform(0.05, 0.05 + 0.15 * s)),
                                    opacity=float(rng.uniform(0.6, 1.0)), color=_fill(rng),
                                    x_pos=float(rng.uniform(0.0, 0.5)), y_pos=float(rng.uniform(0.0, 0.7)))


def _emoji(img, rng, s, other):
    emojis = _emojis()
    for _ in range(int(rng.integers(1, 2 + int(2 * s)))):
        size = float(rng.uniform(0.1, 0.1 + 0.4 * s))
        img = _augly()[0].overlay_emoji(img, emoji_path=emojis[int(rng.integers(len(emojis)))],
                                        opacity=float(rng.uniform(0.7, 1.0)), emoji_size=size,
                                        x_pos=float(rng.uniform(0.0, 1.0 - size)),
                                        y_pos=float(rng.uniform(0.0, 1.0 - size)))
    return img


def _stripes(img, rng, s, other):
    return _augly()[0].overlay_stripes(img, line_width=float(rng.uniform(0.05, 0.05 + 0.4 * s)),
                                       line_color=_fill(rng), line_angle=float(rng.uniform(-90, 90)),
                                       line_density=float(rng.uniform(0.1, 0.1 + 0.6 * s)),
                                       line_type=("solid", "dotted", "dashed")[int(rng.integers(3))],
                                       line_opacity=float(rng.uniform(0.3, 0.3 + 0.6 * s)))


def _overlay_image(img, rng, s, other):
    size = float(rng.uniform(0.15, 0.15 + 0.35 * s))
    return _augly()[0].overlay_image(img, overlay=other(rng).convert("RGB"), opacity=1.0, overlay_size=size,
                                     x_pos=float(rng.uniform(0.0, 1.0 - size)),
                                     y_pos=float(rng.uniform(0.0, 1.0 - size)), max_visible_opacity=1.0)


def _pad(img, rng, s, other):
    return _augly()[0].pad(img, w_factor=float(rng.uniform(0.02, 0.02 + 0.35 * s)),
                           h_factor=float(rng.uniform(0.02, 0.02 + 0.35 * s)), color=_fill(rng))


def _meme(img, rng, s, other):
    """AugLy's meme_format: a caption band over the picture, in AugLy's meme font."""
    w, h = img.size
    band = max(4, int(h * rng.uniform(0.1, 0.1 + 0.25 * s)))
    bg = (255, 255, 255) if rng.random() < 0.8 else _fill(rng)
    out = Image.new("RGB", (w, h + band), bg)
    out.paste(img, (0, band))
    text = str(_WORDS[int(rng.integers(len(_WORDS)))]).upper()
    draw = ImageDraw.Draw(out)
    size = max(6, int(band * 0.6))
    font = ImageFont.truetype(_augly()[1].MEME_DEFAULT_FONT, size)
    while size > 6 and draw.textbbox((0, 0), text, font=font)[2] > 0.92 * w:
        size -= 2
        font = ImageFont.truetype(_augly()[1].MEME_DEFAULT_FONT, size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((w - (right - left)) / 2 - left, (band - (bottom - top)) / 2 - top), text, font=font,
              fill=(0, 0, 0) if sum(bg) > 380 else (255, 255, 255))
    return out


def _screenshot(img, rng, s, other):
    au = _augly()[1]
    template = os.path.join(au.SCREENSHOT_TEMPLATES_DIR, ("web.png", "mobile.png")[int(rng.integers(2))])
    return _augly()[0].overlay_onto_screenshot(img, template_filepath=template,
                                               crop_src_to_fit=bool(rng.random() < 0.5))


def _onto_image(img, rng, s, other):
    size = float(rng.uniform(1.0 - 0.5 * s, 0.95)) if s > 0.1 else 0.95
    return _augly()[0].overlay_onto_background_image(img, background_image=other(rng).convert("RGB"),
                                                     opacity=1.0, overlay_size=size,
                                                     x_pos=float(rng.uniform(0, 1 - size)),
                                                     y_pos=float(rng.uniform(0, 1 - size)), scale_bg=False)


def _mixup(img, rng, s, other):
    weight = float(rng.uniform(0.0, 0.4 * s))       # the other image's share; this one keeps >= 0.6
    return Image.blend(img, other(rng).convert("RGB").resize(img.size, Image.BILINEAR), weight)


def _jpeg(img, rng, s, other):
    return _augly()[0].encoding_quality(img, quality=int(rng.integers(max(5, int(95 - 85 * s)), 96)))


_FUNCS = {
    "crop": _crop, "squash": _squash, "rotate": _rotate, "rotate90": _rotate90,
    "flip": lambda img, rng, s, other: _augly()[0].hflip(img),
    "vflip": lambda img, rng, s, other: _augly()[0].vflip(img),
    "perspective": _perspective, "scale": _scale, "color": _color,
    "grayscale": lambda img, rng, s, other: _augly()[0].grayscale(img),
    "blur": _blur, "noise": _noise, "pixelization": _pixelization, "sharpen": _sharpen,
    "text": _text, "emoji": _emoji, "stripes": _stripes, "overlay_image": _overlay_image,
    "pad": _pad, "meme": _meme, "screenshot": _screenshot, "onto_image": _onto_image, "mixup": _mixup,
    "jpeg": _jpeg,
}
_NEEDS_ROOM = ("text", "emoji", "stripes", "overlay_image", "meme", "screenshot", "onto_image", "perspective",
               "rotate")


def augment(img: Image.Image, rng: np.random.Generator, strength: float = 0.5,
            ops: Iterable[str] = OPS, always: bool = False, other: Other | None = None) -> Image.Image:
    """One random augmentation of ``img`` (RGB); see the module doc."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    chosen = set(check_ops(ops))
    img = img.convert("RGB") if img.mode != "RGB" else img
    if strength == 0.0:
        return img.copy()
    framed = False
    for op in OPS:  # fixed order; the firing draw happens for every op, chosen or not
        fire = rng.random() < PROBABILITY[op]
        if op not in chosen or not (always or fire):
            continue
        if (op in USES_OTHER and other is None) or (op in FRAMES and framed) \
                or (op in _NEEDS_ROOM and min(img.size) < MIN_EDIT_SIDE):
            continue
        img = _FUNCS[op](img, rng, strength, other).convert("RGB")
        framed = framed or op in FRAMES
        if min(img.size) < MIN_SIDE:
            img = img.resize((max(MIN_SIDE, img.size[0]), max(MIN_SIDE, img.size[1])), Image.BILINEAR)
    return img.copy() if img.mode == "RGB" else img.convert("RGB")
