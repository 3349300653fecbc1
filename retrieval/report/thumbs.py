"""JPEG thumbnails of the images a report shows, and their full-size copies.

Bytes are read through :func:`retrieval.extract.inputs.read_items` (any fsspec URL, and the
``<file>#row=<n>`` URIs of Parquet-bytes inputs), decoded with the pipeline's hardened
:func:`~retrieval.extract.preprocess.decode_image` (same caps: no decompression bomb is ever
decoded), shrunk to fit ``size`` x ``size`` and re-encoded as JPEG. A thumbnail that cannot be
made is a reason string, shown as a placeholder: the page never holds a broken image.

With ``full_size`` > 0 the same decode also gives a larger copy (longer side ``full_size``, never
upscaled), re-encoded as JPEG and written to ``<output>/full/<hash>.jpg`` by the worker that made
it (so memory holds no full-size copies); the page links each thumbnail to it. Re-encoding means
the linked file is always a plain JPEG, whatever bytes the source held.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence

from PIL import Image

from retrieval import fsio
from retrieval.extract.inputs import ROW_MARK, read_items
from retrieval.extract.preprocess import DecodePolicy, ImageError, decode_image
from retrieval.progress import Progress

FULL_DIR = "full"


@dataclass(frozen=True)
class Thumb:
    jpeg: bytes | None
    error: str | None = None
    width: int = 0
    height: int = 0
    full: str | None = None     # the full-size copy, relative to the report (None: none written)

    def data_uri(self) -> str:
        if self.jpeg is None:
            raise ValueError("no thumbnail")
        return "data:image/jpeg;base64," + base64.b64encode(self.jpeg).decode("ascii")


def _jpeg(img: Image.Image, quality: int, optimize: bool = True) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=optimize)
    return buf.getvalue()


def make_images(data: bytes, size: int, policy: DecodePolicy = DecodePolicy(), full_size: int = 0,
                quality: int = 80) -> tuple[Thumb, bytes | None]:
    """Image bytes -> (a JPEG thumbnail that fits ``size`` x ``size``, aspect ratio kept; a JPEG
    copy that fits ``full_size`` x ``full_size`` or None when ``full_size`` is 0), one decode."""
    try:
        img, _, _ = decode_image(data, policy, draft_size=max(size, full_size))
        full = None
        if full_size > 0:       # shrunk in place (Pillow's bilinear is antialiased): the thumbnail follows
            img.thumbnail((full_size, full_size), Image.BILINEAR)
            full = _jpeg(img, 85, optimize=False)
        img.thumbnail((size, size), Image.BILINEAR)
        thumb = _jpeg(img, quality)
    except ImageError as exc:
        return Thumb(None, str(exc)), None
    except Exception as exc:  # a decoder bug must not fail the report
        return Thumb(None, f"thumbnail failed: {exc.__class__.__name__}: {exc}"), None
    return Thumb(thumb, None, img.width, img.height), full


def make_thumbnail(data: bytes, size: int, policy: DecodePolicy = DecodePolicy(), quality: int = 80) -> Thumb:
    """Image bytes -> a JPEG that fits ``size`` x ``size`` (aspect ratio kept)."""
    return make_images(data, size, policy, 0, quality)[0]


def _chunk_key(uri: str) -> str:
    # Parquet-bytes items of one file go to the same worker (read_items reads each file once)
    return uri.rsplit(ROW_MARK, 1)[0] if ROW_MARK in uri else uri


def make_thumbnails(uris: Iterable[str], size: int, policy: DecodePolicy = DecodePolicy(),
                    threads: int = 4, progress_seconds: float = 10.0, full_size: int = 0,
                    output_url: str | None = None) -> dict[str, Thumb]:
    """Thumbnails of the distinct ``uris`` (empty URIs map to an error), read and decoded by
    ``threads`` workers; with ``full_size`` and ``output_url``, each worker also writes the
    full-size copy to ``<output_url>/full/<hash>.jpg`` (``Thumb.full``)."""
    distinct = list(dict.fromkeys(u for u in uris))
    out: dict[str, Thumb] = {u: Thumb(None, "no uri") for u in distinct if not u}
    todo = [u for u in distinct if u]
    if not todo:
        return out
    groups: dict[str, list[str]] = {}
    for u in todo:
        groups.setdefault(_chunk_key(u), []).append(u)
    n = max(1, min(threads, len(groups)))
    chunks: list[list[str]] = [[] for _ in range(n)]
    for i, g in enumerate(groups.values()):
        chunks[i % n].extend(g)
    progress = Progress("report thumbnails", total=len(todo), every=progress_seconds, unit="images")

    def _make(uri: str, data: bytes) -> Thumb:
        thumb, full = make_images(data, size, policy, full_size if output_url else 0)
        if full is not None and output_url:
            name = f"{FULL_DIR}/{thumb_name(uri)}"
            fsio.write_bytes(fsio.join(output_url, name), full)
            thumb = dataclasses.replace(thumb, full=name)
        return thumb

    def work(chunk: Sequence[str]) -> dict[str, Thumb]:
        res = {}
        for _, uri, data, err in read_items([(u, u) for u in chunk], policy.max_bytes):
            res[uri] = Thumb(None, err) if err is not None else _make(uri, data)
            progress.update(1, errors=int(res[uri].jpeg is None))
        return res

    with ThreadPoolExecutor(max_workers=n) as pool:
        for res in pool.map(work, chunks):
            out.update(res)
    progress.finish()
    return out


def thumb_name(uri: str) -> str:
    """File name of a thumbnail written beside the report (a hash: never a path from the data)."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:32] + ".jpg"


def write_thumbnails(thumbs: dict[str, Thumb], output_url: str, subdir: str = "thumbs") -> dict[str, str]:
    """Write each thumbnail to ``<output>/<subdir>/<hash>.jpg``; return ``uri -> relative path``."""
    rel = {}
    for uri, t in thumbs.items():
        if t.jpeg is None:
            continue
        name = f"{subdir}/{thumb_name(uri)}"
        fsio.write_bytes(fsio.join(output_url, name), t.jpeg)
        rel[uri] = name
    return rel
