"""Image decoding and resizing, hardened for untrusted input.

Policy (README "Preprocessing"):
- Formats: JPEG (incl. MPO), PNG, WebP, BMP, TIFF, GIF (first frame). Anything else is an
  error row ("unsupported format"); PIL is never allowed to pick other decoders (EPS, PSD...).
- Caps: more than ``max_bytes`` bytes, or more than ``max_pixels`` pixels (read from the header,
  before any pixel is decoded), is an error row: no decompression bomb is ever decoded.
- EXIF orientation is applied; grayscale, palette, CMYK, 16-bit and alpha images become RGB
  (alpha is composited on white; 16-bit is scaled, not clipped).
- Degenerate sizes: a smaller side under ``min_side`` px (e.g. 1x1) or an aspect ratio above
  ``max_aspect`` (e.g. 2000x3) is an error row: such an image carries no content a 224 x 224
  descriptor can describe, and reporting it beats a meaningless match.
- Aspect ratio: ``squash`` (default) resizes the WHOLE image to R x R, bilinear; nothing is cropped,
  so a copy that keeps any part of the content keeps it in the descriptor's field of view.
  ``letterbox`` keeps the aspect ratio and pads to a square with grey.
"""
from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from retrieval.extract import decoders
from retrieval.extract.inputs import read_items
from retrieval.extract.prefetch import ordered_map

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")   # MPO opens through JPEG
Image.init()   # register every plugin so that formats=ALLOWED_FORMATS resolves (MPO...)
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None   # we enforce our own cap from the header, before decoding


class ImageError(ValueError):
    """An input that is not a usable image; the message is the error row's reason."""


@dataclass(frozen=True)
class DecodePolicy:
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 89_478_485
    min_side: int = 8
    max_aspect: float = 25.0

    @classmethod
    def from_config(cls, pre: dict) -> "DecodePolicy":
        return cls(max_bytes=int(pre["max_bytes"]), max_pixels=int(pre["max_pixels"]),
                   min_side=int(pre["min_side"]), max_aspect=float(pre["max_aspect"]))


def _sniff(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg")) or b"<html" in head:
        return "not an image: looks like HTML/XML text"
    try:
        data[:512].decode("utf-8")
        return "not an image: looks like text"
    except UnicodeDecodeError:
        return "unsupported or unrecognised image format"


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode in ("I", "F") and arr.max() <= 255:
            top = 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_checked(data: bytes, policy: DecodePolicy = DecodePolicy()) -> tuple[Image.Image, int, int, int]:
    """Bytes -> (opened PIL image, nothing decoded yet; shown width; shown height; EXIF orientation),
    after every check that needs only the header (size, format, caps). Raises :class:`ImageError`."""
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    if len(data) > policy.max_bytes:
        raise ImageError(f"file too large: {len(data)} bytes > max_bytes {policy.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        try:
            fmt = Image.open(io.BytesIO(data)).format
        except Exception:
            fmt = None
        if fmt:
            raise ImageError(f"unsupported format {fmt} (allowed: {', '.join(ALLOWED_FORMATS)})") from None
        raise ImageError(_sniff(data)) from None
    except Exception as exc:
        raise ImageError(f"corrupt image header: {exc}") from None
    w, h = img.size
    if w * h > policy.max_pixels:
        raise ImageError(f"too many pixels: {w}x{h} > max_pixels {policy.max_pixels} "
                         "(decompression bomb cap)")
    orientation = _orientation(img, data)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if min(w, h) < policy.min_side:
        raise ImageError(f"degenerate size {w}x{h}: smaller side < min_side {policy.min_side} px")
    if max(w, h) / min(w, h) > policy.max_aspect:
        raise ImageError(f"degenerate size {w}x{h}: aspect ratio {max(w, h) / min(w, h):.1f} > "
                         f"max_aspect {policy.max_aspect}")
    return img, w, h, orientation


def _orientation(img: Image.Image, data: bytes) -> int:
    """The EXIF orientation (1 = as stored). A PNG without an ``eXIf`` chunk has none: asking Pillow
    would decode the whole image to look for one after the pixels."""
    if img.format == "PNG":
        chunks = decoders.png_chunks(data)      # a broken chunk list: scan the bytes, as before
        if b"eXIf" not in (chunks if chunks is not None else data):
            return 1
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _load(img: Image.Image, orientation: int, draft_size: int | None) -> Image.Image:
    """Decode an image :func:`open_checked` opened: RGB, EXIF orientation applied."""
    try:
        if draft_size and img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L", "YCbCr"):
            img.draft("RGB", (draft_size, draft_size))
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img) if orientation != 1 else img
        return _to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"corrupt or truncated image: {exc.__class__.__name__}: {exc}") from None


def decode_image(data: bytes, policy: DecodePolicy = DecodePolicy(),
                 draft_size: int | None = None) -> tuple[Image.Image, int, int]:
    """Bytes -> (RGB PIL image, original width, original height), after EXIF orientation.

    ``draft_size`` lets the JPEG decoder skip resolution it does not need (DCT scaling); the result
    is never smaller than ``draft_size`` on either side. Raises :class:`ImageError`."""
    img, w, h, orientation = open_checked(data, policy)
    return _load(img, orientation, draft_size), w, h


def decode_pixels(data: bytes, policy: DecodePolicy = DecodePolicy(),
                  draft_size: int | None = None) -> tuple[torch.Tensor, int, int, int]:
    """Bytes -> (3 x H x W uint8 pixels as stored, shown width, shown height, EXIF orientation still to
    apply) by the fast decoders (:mod:`retrieval.extract.decoders`), Pillow's where they do not
    apply; the same pixels as :func:`decode_image` (before orientation). Raises :class:`ImageError`."""
    img, w, h, orientation = open_checked(data, policy)
    kind = decoders.fast_format(img, data)
    if kind is not None:
        sw, sh = img.size
        x = decoders.decode_fast(data, kind, sw, sh, draft_size or max(sw, sh))
        if x is not None:
            return x, w, h, orientation
    pil = _load(img, orientation, draft_size)      # oriented already
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1), w, h, 1


def resize(img: Image.Image, size: int, mode: str = "squash") -> Image.Image:
    """Whole image -> size x size (bilinear, antialiased). ``letterbox`` pads instead of squashing."""
    if mode == "squash":
        return img.resize((size, size), Image.BILINEAR)
    if mode == "letterbox":
        w, h = img.size
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size), (124, 116, 104))
        canvas.paste(img.resize((nw, nh), Image.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    raise ValueError(f"unknown resize mode {mode!r}")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor 3 x H x W in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


DECODERS = ("fast", "pillow")


def prepare(data: bytes, sizes: tuple[int, ...], mode: str = "squash",
            policy: DecodePolicy = DecodePolicy(), decoder: str = "fast") -> tuple[list[torch.Tensor], int, int]:
    """Bytes -> one float tensor (3 x s x s, in [0, 1]) per requested size, plus the original width and
    height. ``decoder``: ``fast`` (:func:`decode_pixels` + torch's resize) or ``pillow`` (Pillow's decode
    and resize, the path before 0.3)."""
    if decoder == "pillow":
        img, w, h = decode_image(data, policy, draft_size=max(sizes))
        return [to_tensor(resize(img, s, mode)) for s in sizes], w, h
    if decoder != "fast":
        raise ValueError(f"unknown preprocess.decoder {decoder!r} (one of {', '.join(DECODERS)})")
    x, w, h, orientation = decode_pixels(data, policy, draft_size=max(sizes))
    return [decoders.resize_tensor(x, s, mode, orientation) for s in sizes], w, h


def _prepare_item(item: tuple[str, str, bytes | None, str | None], sizes: tuple[int, ...], mode: str,
                  policy: DecodePolicy, decoder: str, pdq: bool = False, regions: tuple[str, ...] = ()
                  ) -> tuple[str, str, list | None, int, int, str | None, Any]:
    image_id, uri, data, err = item
    tensors, w, h, hashed = None, 0, 0, None
    if err is None:
        try:
            tensors, w, h = (prepare_regions(data, sizes, mode, policy, regions) if regions
                             else prepare(data, sizes, mode, policy, decoder))
            if pdq:
                hashed = pdq_of(data, policy)
        except ImageError as exc:
            err = str(exc)
        except Exception as exc:  # a decoder bug must not kill the task
            err = f"decode failed: {exc.__class__.__name__}: {exc}"
    return image_id, uri, (None if err is not None else tensors), w, h, err, hashed


def pdq_of(data: bytes, policy: DecodePolicy = DecodePolicy()) -> tuple[bytes, int, bytes]:
    """Bytes -> the PDQ hash, its quality and the 7 dihedral variants (:mod:`retrieval.hashing`),
    from a FULL decode of the image (no JPEG draft, no resize: those change the hash), after EXIF
    orientation, in RGB as the model sees it."""
    from retrieval.hashing import pdq_of_rgb

    img, _, _ = decode_image(data, policy, draft_size=None)
    return pdq_of_rgb(np.asarray(img, dtype=np.uint8))


def prepare_regions(data: bytes, sizes: tuple[int, ...], mode: str, policy: DecodePolicy,
                    names: Sequence[str]) -> tuple[list[tuple[str | None, list[torch.Tensor]]], int, int]:
    """Bytes -> ``[(region label, tensors)]``: the whole image (label None) first, then the regions
    of ``names`` (:mod:`retrieval.extract.regions`), each cropped from the decoded image and resized
    like the whole; plus the original width and height."""
    from retrieval.extract.regions import boxes, crop

    img, w, h = decode_image(data, policy, draft_size=2 * max(sizes))
    out: list[tuple[str | None, list[torch.Tensor]]] = [(None, [to_tensor(resize(img, s, mode)) for s in sizes])]
    for label, box in boxes(img, names):
        part = crop(img, box)
        out.append((label, [to_tensor(resize(part, s, mode)) for s in sizes]))
    return out, w, h


def prepare_items(rows: list[tuple[str, str]], sizes: tuple[int, ...], mode: str, policy: DecodePolicy,
                  key_column: str | None = None, bytes_column: str | None = None, decoder: str = "fast",
                  workers: int = 0, ahead: int = 64, pdq: list | None = None, regions: Sequence[str] = ()
                  ) -> Iterator[tuple[str, str, list | None, int, int, str | None]]:
    """Read, decode and resize ``(image_id, uri)`` rows in order (``retrieval extract`` and
    ``retrieval fit``): ``(image_id, uri, tensors, width, height, error)``, one per row; ``error`` (the
    error row's reason) is set, and ``tensors`` None, for an input that could not be read or decoded.
    With ``regions`` (query regions), ``tensors`` is :func:`prepare_regions`' list of
    ``(label, tensors)``, the whole image first.
    ``workers`` > 0: read and decode on that many threads, up to ``ahead`` items ahead of the consumer
    (:func:`retrieval.extract.prefetch.ordered_map`), so that decoding overlaps what the consumer does
    with the items (the model's forward); the order and the results are the same. ``pdq``: a list that
    receives, per row yielded without error, its :func:`pdq_of` (computed on the decode threads; the
    last item is the current row's when it is yielded)."""
    fn = functools.partial(_prepare_item, sizes=sizes, mode=mode, policy=policy, decoder=decoder,
                           pdq=pdq is not None, regions=tuple(regions))
    items = read_items(rows, policy.max_bytes, key_column, bytes_column)
    results = map(fn, items) if workers <= 0 else ordered_map(fn, items, workers, ahead)
    try:
        for *row, hashed in results:
            if pdq is not None and row[5] is None:
                pdq.append(hashed)
            yield tuple(row)
    finally:        # closing this generator stops the decode threads now
        close = getattr(results, "close", None)
        if close is not None:
            close()
