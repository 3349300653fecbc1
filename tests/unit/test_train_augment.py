"""Augmentations (AugLy 1.0.0 + torchvision) keep images valid (RGB, size, range) for every option,
use the other training image where they say so, and are seed-reproducible."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retrieval.sample import real_photos
from retrieval.train.augment import FRAMES, OPS, USES_OTHER, augment, check_ops

SIZE_KEPT = {"flip", "vflip", "perspective", "color", "grayscale", "blur", "noise", "pixelization", "sharpen",
             "text", "emoji", "stripes", "overlay_image", "mixup", "jpeg"}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    img = Image.open(real_photos("train")[0]).convert("RGB")
    img.thumbnail((160, 160))
    return img


@pytest.fixture(scope="module")
def other_photo() -> Image.Image:
    img = Image.open(real_photos("train")[1]).convert("RGB")
    img.thumbnail((160, 160))
    return img


def _other(img):
    return lambda rng: img


def _valid(out: Image.Image) -> np.ndarray:
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    assert min(out.size) >= 8
    arr = np.asarray(out)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("strength", [0.05, 0.5, 1.0])
def test_every_op_gives_a_valid_changed_image(photo, other_photo, op, strength):
    for seed in range(4):
        out = augment(photo, np.random.default_rng(seed), strength, ops=(op,), always=True,
                      other=_other(other_photo))
        arr = _valid(out)
        if op in SIZE_KEPT:
            assert out.size == photo.size
        if seed == 0 and op != "jpeg" or strength == 1.0:
            # every op really does something (jpeg at quality ~90 may round-trip tiny images almost
            # exactly, but at strength 1 it cannot)
            same = out.size == photo.size and np.array_equal(arr, np.asarray(photo))
            assert not same, f"{op} at strength {strength} left the image unchanged"


def test_op_specific_effects(photo):
    rng = np.random.default_rng(0)
    gray = np.asarray(augment(photo, rng, 0.5, ("grayscale",), always=True)).astype(int)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    flipped = np.asarray(augment(photo, rng, 0.5, ("flip",), always=True))
    assert np.array_equal(flipped, np.asarray(photo)[:, ::-1])
    framed = augment(photo, np.random.default_rng(1), 0.8, ("pad",), always=True)
    assert framed.size[0] > photo.size[0] and framed.size[1] > photo.size[1]
    meme = augment(photo, np.random.default_rng(1), 0.8, ("meme",), always=True)
    assert meme.size[0] == photo.size[0] and meme.size[1] > photo.size[1]
    # the picture itself sits below the caption band, unchanged
    assert np.array_equal(np.asarray(meme)[meme.size[1] - photo.size[1]:], np.asarray(photo))
    cropped = augment(photo, np.random.default_rng(3), 1.0, ("crop",), always=True)
    assert cropped.size[0] <= photo.size[0] and cropped.size[1] <= photo.size[1]
    assert cropped.size != photo.size


@pytest.mark.parametrize("size", [(8, 8), (9, 200), (300, 12)])
def test_tiny_and_thin_images_stay_valid(size):
    img = Image.new("RGB", size, (200, 30, 60))
    for seed in range(10):
        _valid(augment(img, np.random.default_rng(seed), 1.0, OPS, always=True))
        _valid(augment(img, np.random.default_rng(seed), 1.0, OPS))


def test_non_rgb_input_and_strength_zero(photo):
    la = photo.convert("LA")
    _valid(augment(la, np.random.default_rng(0), 0.7))
    same = augment(photo, np.random.default_rng(0), 0.0)
    assert np.array_equal(np.asarray(same), np.asarray(photo))


def test_reproducible_from_the_seed(photo):
    a = augment(photo, np.random.default_rng([7, 1, 2]), 0.8)
    b = augment(photo, np.random.default_rng([7, 1, 2]), 0.8)
    c = augment(photo, np.random.default_rng([7, 1, 3]), 0.8)
    assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size != c.size or not np.array_equal(np.asarray(a), np.asarray(c))


def test_cut_paste_and_mixup_use_the_other_image_and_are_skipped_without_one(photo):
    red = Image.new("RGB", photo.size, (255, 0, 0))
    for op in USES_OTHER:
        out = np.asarray(augment(photo, np.random.default_rng(2), 1.0, (op,), always=True, other=_other(red)))
        src = np.asarray(photo).astype(int)
        if out.shape == src.shape:      # overlay_image, mixup: the picture moved toward pure red
            assert (out[..., 0].astype(int) - src[..., 0]).mean() > 1.0, op
        else:                           # onto_image: the picture pasted onto a red canvas
            assert (out.reshape(-1, 3) == (255, 0, 0)).all(axis=1).mean() > 0.02, op
        alone = augment(photo, np.random.default_rng(2), 1.0, (op,), always=True)
        assert np.array_equal(np.asarray(alone), np.asarray(photo)), f"{op} without another image must skip"


def test_at_most_one_frame_per_view(photo, other_photo):
    for seed in range(6):
        out = augment(photo, np.random.default_rng(seed), 1.0, FRAMES, always=True, other=_other(other_photo))
        _valid(out)
        # pad alone grows both sides by < 2 x 0.37 of the picture; two frames on top of each other
        # (pad + meme + screenshot...) would give the template's size or more
        assert out.size == augment(photo, np.random.default_rng(seed), 1.0, FRAMES[:1], always=True).size


def test_bad_options_are_refused(photo):
    with pytest.raises(ValueError, match="unknown augmentation"):
        check_ops(["crop", "sepia"])
    from retrieval import config

    with pytest.raises(config.ConfigError, match="sepia"):
        config.load(sets=['train.augmentations=["crop", "sepia"]'])
    with pytest.raises(ValueError, match="strength"):
        augment(photo, np.random.default_rng(0), 1.5)


def test_font_tables_are_read_without_unpickling():
    """The library never unpickles (test_security); AugLy's font tables are read by walking the
    opcodes, and give exactly what unpickling them would (checked here, in a test, with pickle)."""
    import glob
    import os
    import pickle

    import augly.utils as au

    from retrieval.train.augment import _fonts, pickled_int_list

    files = sorted(glob.glob(os.path.join(au.FONTS_DIR, "*.pkl")))
    assert len(files) > 50
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        assert pickled_int_list(data) == list(pickle.loads(data)), f
    assert len(_fonts()) >= 10
    with pytest.raises(ValueError, match="not a pickled list of ints"):
        pickled_int_list(pickle.dumps({"a": [1, 2]}))
    with pytest.raises(ValueError, match="not a pickled list of ints"):
        pickled_int_list(pickle.dumps([1, "os.system"]))
