"""The fast decode path (``preprocess.decoder: fast``, the default): the same pixels as Pillow's decode,
fewer CPU cycles, and a resize in torch.

Measured by ``tests/bench/bench_decode.py`` (docs/guide.md "Decoding speed"): per image, decoding is done by

- JPEG (RGB, grey, YCbCr; not CMYK): ``simplejpeg`` (libjpeg-turbo), at exactly the DCT scale Pillow's
  ``draft`` picks (1/1, 1/2, 1/4 or 1/8, the smallest image not below the largest model size), so the
  pixels are Pillow's, bit for bit; 5-15% fewer cycles (no Python-level chunk loop; at 1/8 scale the
  cost is libjpeg-turbo's entropy decoding, which no binding skips).
- PNG (8-bit RGB, grey, palette without transparency; no ``eXIf`` or ``iCCP`` chunk, :func:`png_chunks`:
  libpng prints warnings on some ICC profiles straight to the process's stderr) and WebP (still, no alpha):
  ``torchvision.io`` (libpng / libwebp); bit-identical to Pillow; ~10% fewer cycles (Pillow's WebP
  goes through its animation decoder).
- anything else (CMYK, alpha, 16-bit, animation, BMP/TIFF/GIF, EXIF or an ICC profile in a PNG) and any input the fast
  decoder refuses: Pillow, exactly as ``preprocess.decoder: pillow``, errors included.

The resize is torch's antialiased bilinear on uint8 (the same filter as Pillow's ``BILINEAR``
resize, vectorised): 3-6x fewer cycles than Pillow's, within 1-2 grey levels of it. The EXIF
orientation is applied to the small resized tensor (a flip / transpose), not to the decoded image.

Every path here raises :class:`~retrieval.extract.preprocess.ImageError` exactly where the Pillow
path does (the same header checks run first: :func:`~retrieval.extract.preprocess.open_checked`).
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:   # a required dependency (setup.py); without it JPEGs take Pillow's path, with the same pixels
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only on an incomplete install
    simplejpeg = None

GREY = (124, 116, 104)   # letterbox padding (as the Pillow path)


def jpeg_scale(w: int, h: int, size: int) -> int:
    """The DCT scale denominator Pillow's ``Image.draft("RGB", (size, size))`` picks for a w x h JPEG."""
    scale = min(w // size, h // size)
    for s in (8, 4, 2):
        if scale >= s:
            return s
    return 1


def _jpeg(data: bytes, w: int, h: int, size: int) -> np.ndarray:
    s = jpeg_scale(w, h, size)
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-w // s), min_height=-(-h // s),
                                  min_factor=s, strict=True)


def _torchvision(data: bytes, fmt: str) -> torch.Tensor:
    from torchvision import io as tio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the decoders only read the buffer: no writable copy of the bytes
        buf = torch.frombuffer(data, dtype=torch.uint8)
        if fmt == "PNG":
            x = tio.decode_png(buf, mode=tio.ImageReadMode.RGB)
        else:
            x = tio.decode_webp(buf, mode=tio.ImageReadMode.RGB)
    if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"unexpected decoded tensor {tuple(x.shape)} {x.dtype}")
    return x


def fast_format(img, data: bytes) -> str | None:
    """Which fast decoder takes this opened (header-only) PIL image, or None (Pillow's path)."""
    fmt, mode = img.format, img.mode
    if fmt in ("JPEG", "MPO") and mode in ("RGB", "L", "YCbCr"):
        return "JPEG" if simplejpeg is not None else None
    if getattr(img, "n_frames", 1) != 1:
        return None
    if fmt == "PNG" and "transparency" not in img.info \
            and (mode == "P" or (mode in ("RGB", "L") and _png_depth(data) == 8)):
        chunks = png_chunks(data)
        return "PNG" if chunks is not None and not chunks & {b"eXIf", b"iCCP"} else None
    if fmt == "WEBP" and mode == "RGB":
        return "WEBP"
    return None


def png_chunks(data: bytes) -> set[bytes] | None:
    """The chunk types of a PNG, found by walking the chunks' lengths up to ``IEND`` (not by scanning the
    compressed data: three scans of a 4 MP PNG cost ~3.5 ms); None when the chunk list is cut short or
    broken (Pillow's path then decodes it, or gives its error)."""
    pos, n, types = 8, len(data), set()
    while pos + 8 <= n:
        kind = data[pos + 4:pos + 8]
        types.add(kind)
        if kind == b"IEND":
            return types
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return None


def _png_depth(data: bytes) -> int:
    """The bit depth in a PNG's IHDR (byte 24), 0 when the header is too short."""
    return data[24] if len(data) > 24 else 0


def decode_fast(data: bytes, kind: str, w: int, h: int, size: int) -> torch.Tensor | None:
    """Pixels of the stored (not yet oriented) image as a 3 x H x W uint8 tensor, or None when the
    fast decoder refuses the input (the caller then takes Pillow's path, whose error row, if any, is
    today's). ``w``, ``h``: the stored size; ``size``: the largest size the model needs."""
    try:
        if kind == "JPEG":
            return torch.from_numpy(_jpeg(data, w, h, size)).permute(2, 0, 1)
        return _torchvision(data, kind)
    except Exception as exc:   # corrupt, truncated, a variant the library does not take
        log.debug("fast %s decoder refused the input (%s): Pillow decodes it", kind, exc)
        return None


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (2-8) to a C x H x W tensor, as ``PIL.ImageOps.exif_transpose``."""
    if orientation == 2:
        return x.flip(2)
    if orientation == 3:
        return x.flip(1, 2)
    if orientation == 4:
        return x.flip(1)
    if orientation == 5:
        return x.transpose(1, 2)
    if orientation == 6:
        return torch.rot90(x, -1, (1, 2))
    if orientation == 7:
        return x.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return torch.rot90(x, 1, (1, 2))
    return x


def _interp(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """uint8 3 x H x W -> uint8 3 x h x w, antialiased bilinear (torch's vectorised uint8 kernel wants
    channels-last memory)."""
    if tuple(x.shape[1:]) == hw:
        return x
    x4 = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(x4, size=hw, mode="bilinear", antialias=True, align_corners=False)[0]


def resize_tensor(x: torch.Tensor, size: int, mode: str = "squash", orientation: int = 1) -> torch.Tensor:
    """Decoded uint8 3 x H x W pixels (stored orientation) -> float 3 x size x size in [0, 1], oriented
    after the resize (a flip / transpose of the small result: the decoded image is never copied).
    ``squash`` resizes the whole image; ``letterbox`` keeps the aspect ratio and pads with grey."""
    if mode == "squash":
        return orient(_interp(x, (size, size)), orientation).contiguous().float().div_(255.0)
    if mode != "letterbox":
        raise ValueError(f"unknown resize mode {mode!r}")
    swap = orientation in (5, 6, 7, 8)
    h, w = x.shape[1:]
    sh, sw = (w, h) if swap else (h, w)           # the shown size
    scale = size / max(sw, sh)
    nw, nh = max(1, round(sw * scale)), max(1, round(sh * scale))
    small = orient(_interp(x, (nw, nh) if swap else (nh, nw)), orientation)
    out = torch.tensor(GREY, dtype=torch.uint8).view(3, 1, 1).repeat(1, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[:, top:top + nh, left:left + nw] = small
    return out.float().div_(255.0)
