"""Odd-but-valid and broken image files for the extraction tests (generated, not committed)."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

# name -> expected outcome: "ok" or a substring of the error reason
EXPECTED = {
    "gray.jpg": "ok", "cmyk.jpg": "ok", "deep16.png": "ok", "palette.png": "ok", "alpha.png": "ok",
    "anim.gif": "ok", "exif_rot.jpg": "ok", "photo.webp": "ok", "photo.bmp": "ok", "photo.tiff": "ok",
    "with space.jpg": "ok", "ünïcødé 写真.png": "ok", "<script>alert(1)<'script>.jpg": "ok",
    "sub/dir/nested.jpg": "ok",
    "corrupt.jpg": "corrupt", "truncated.jpg": "truncated", "empty.jpg": "empty file",
    "page.jpg": "HTML", "notes.jpg": "text", "image.ppm": "unsupported format PPM",
    "bomb.png": "decompression bomb", "tiny.png": "degenerate size 1x1", "strip.png": "degenerate size 2000x3",
}


def _photo(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 3) % 256], -1).astype(np.uint8)
    arr = np.clip(arr.astype(int) + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_zoo(root: str) -> dict[str, str]:
    os.makedirs(os.path.join(root, "sub", "dir"), exist_ok=True)
    p = lambda n: os.path.join(root, n)  # noqa: E731
    base = _photo()
    base.convert("L").save(p("gray.jpg"))
    base.convert("CMYK").save(p("cmyk.jpg"))
    Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257).save(p("deep16.png"))
    base.convert("P", palette=Image.ADAPTIVE).save(p("palette.png"))
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(p("alpha.png"))
    frames = [_photo(seed=i) for i in range(3)]
    frames[0].save(p("anim.gif"), save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: stored 96x64, shown 64x96
    base.save(p("exif_rot.jpg"), exif=exif.tobytes())
    base.save(p("photo.webp"))
    base.save(p("photo.bmp"))
    base.save(p("photo.tiff"))
    base.save(p("with space.jpg"))
    base.save(p("ünïcødé 写真.png"))
    base.save(p("<script>alert(1)<'script>.jpg"))
    base.save(p("sub/dir/nested.jpg"))
    buf = io.BytesIO()
    _photo(256, 256).save(buf, "JPEG")
    good = buf.getvalue()
    with open(p("corrupt.jpg"), "wb") as fh:
        fh.write(good[:200] + b"\x00garbage" * 50)
    with open(p("truncated.jpg"), "wb") as fh:
        fh.write(good[: len(good) // 2])
    open(p("empty.jpg"), "wb").close()
    with open(p("page.jpg"), "w") as fh:
        fh.write("<!DOCTYPE html><html><body>not an image</body></html>")
    with open(p("notes.jpg"), "w") as fh:
        fh.write("just some text\n")
    base.save(p("image.ppm"))
    Image.new("1", (12000, 12000)).save(p("bomb.png"))
    Image.new("RGB", (1, 1)).save(p("tiny.png"))
    Image.new("RGB", (2000, 3)).save(p("strip.png"))
    return {name: p(name) for name in EXPECTED}
