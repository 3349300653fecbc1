"""Training images and the views made from them.

:class:`ImageSet` reads any input the extraction job accepts (directory, CSV/Parquet manifest,
Parquet with bytes; any fsspec URL) through :mod:`retrieval.extract.inputs`, decodes each image
once with the extraction decoder (same format whitelist and caps) and keeps it in memory, downscaled
so that its longer side is at most ``max_side`` (a 384 px image is ~0.4 MB: 10,000 images ~4 GB).
Unreadable images are skipped and counted, with their reasons, in ``errors``.

A *view* is ``augment(image) -> resize to R -> tensor``; its randomness comes from
``view_rng(seed, *key)``, so a view depends only on its key (stage, step, image, role), never on
the process that draws it: a data-parallel run sees exactly the batches a single process sees.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from retrieval.extract import inputs as inputs_mod
from retrieval.extract.preprocess import DecodePolicy, ImageError, decode_image, resize, to_tensor
from retrieval.train.augment import Other, augment

log = logging.getLogger(__name__)


def view_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) for k in key]])


@dataclass
class ImageSet:
    ids: list[str]
    images: list[Image.Image]
    errors: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for i, img in zip(self.ids, self.images):
            h.update(f"{i}\t{img.size[0]}x{img.size[1]}\n".encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        return {"input": self.source, "images": len(self), "errors": len(self.errors),
                "error_examples": [f"{i}: {e}" for i, e in self.errors[:5]],
                "fingerprint": self.fingerprint()}


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    if max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    return img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                      Image.BILINEAR)


def decode_all(items: Iterable[tuple[str, str, bytes | None, str | None]], policy: DecodePolicy,
               max_side: int, source: str = "") -> ImageSet:
    ids, images, errors = [], [], []
    for image_id, _uri, data, err in items:
        if err is None:
            try:
                img, _, _ = decode_image(data, policy, draft_size=max_side)
                images.append(_shrink(img, max_side))
                ids.append(image_id)
                continue
            except ImageError as exc:
                err = str(exc)
            except Exception as exc:  # a decoder bug must not stop training
                err = f"decode failed: {exc.__class__.__name__}: {exc}"
        errors.append((image_id, err))
    for image_id, err in errors[:10]:
        log.warning("training input %s skipped: %s", image_id, err)
    return ImageSet(ids, images, errors, source)


def load_images(url: str, policy: DecodePolicy = DecodePolicy(), max_side: int = 384,
                input_format: str = "auto", key_column: str | None = None,
                bytes_column: str | None = None) -> ImageSet:
    """Every readable image of an extraction-style input, decoded and downscaled; raises
    ``InputError`` when the input is missing or holds no usable image."""
    listing = inputs_mod.list_inputs(url, input_format, 1, key_column, bytes_column)
    d = listing.to_pydict()
    rows = [(i, u) for i, u, e in zip(d["image_id"], d["uri"], d["error"]) if e is None]
    listed_errors = [(i, e) for i, e in zip(d["image_id"], d["error"]) if e is not None]
    images = decode_all(inputs_mod.read_items(rows, policy.max_bytes, key_column, bytes_column),
                        policy, max_side, url)
    images.errors = listed_errors + images.errors
    if len(images) < 2:
        raise inputs_mod.InputError(f"training input {url}: {len(images)} usable image(s) "
                                    f"({len(images.errors)} unreadable); contrastive training needs at least 2")
    log.info("training input %s: %d images (%d skipped)", url, len(images), len(images.errors))
    return images


def other_picker(images: ImageSet, i: int) -> Other:
    """The cut-paste / mixup partner of image ``i``: another training image, drawn from the view's rng."""
    n = len(images)

    def pick(rng: np.random.Generator) -> Image.Image:
        j = int(rng.integers(n - 1)) if n > 1 else 0
        return images.images[j + (1 if n > 1 and j >= i else 0)]
    return pick


def same_view(img: Image.Image, rng: np.random.Generator, sizes: Sequence[int], strength: float,
              ops: Sequence[str], resize_mode: str = "squash", other: Other | None = None) -> list[torch.Tensor]:
    """ONE augmentation of ``img`` at several resolutions (stage 3: the same picture, low vs high)."""
    aug = augment(img, rng, strength, ops, other=other)
    return [to_tensor(resize(aug, s, resize_mode)) for s in sizes]
