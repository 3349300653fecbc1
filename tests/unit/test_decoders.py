"""The fast decode path (``preprocess.decoder: fast``): Pillow's pixels from the fast decoders, torch's resize
within 1-2 grey levels of Pillow's, the same error rows, and the ordered look-ahead map that overlaps
decoding with the model."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.extract import decoders
from retrieval.extract.prefetch import ordered_map
from retrieval.extract.preprocess import (DecodePolicy, ImageError, decode_image, decode_pixels, open_checked,
                                          prepare, prepare_items)
from tests.imagezoo import EXPECTED, _photo, make_zoo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth gradients + texture + an edge: a photo-like test picture of any size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([128 + 100 * np.sin(x / (7 + seed)), 128 + 100 * np.cos(y / 11), (x + y) % 256], -1)
    arr[h // 3: h // 2, w // 4: w // 2] = (250, 20, 30)
    arr += rng.normal(0, 12, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _oriented(data: bytes, size: int) -> np.ndarray:
    x, _, _, orientation = decode_pixels(data, draft_size=size)
    return decoders.orient(x, orientation).permute(1, 2, 0).numpy()


def _cases() -> list[tuple[str, bytes, str]]:
    """(name, bytes, the fast decoder that must take it)."""
    out = []
    for w, h in ((40, 30), (300, 225), (500, 380), (1000, 700), (2100, 1900), (3000, 200)):
        img = _photo_like(w, h, seed=w % 5)
        out.append((f"jpeg {w}x{h}", _encoded(img, "JPEG", quality=90), "JPEG"))
    big = _photo_like(1200, 900)
    out += [("jpeg 4:4:4", _encoded(big, "JPEG", quality=95, subsampling=0), "JPEG"),
            ("jpeg progressive", _encoded(big, "JPEG", quality=85, progressive=True), "JPEG"),
            ("jpeg grey", _encoded(big.convert("L"), "JPEG"), "JPEG"),
            ("png rgb", _encoded(big, "PNG"), "PNG"),
            ("png small", _encoded(_photo_like(150, 100), "PNG"), "PNG"),
            ("png grey", _encoded(big.convert("L"), "PNG"), "PNG"),
            ("png palette", _encoded(big.convert("P", palette=Image.ADAPTIVE), "PNG"), "PNG"),
            ("webp lossy", _encoded(big, "WEBP", quality=80), "WEBP"),
            ("webp lossless", _encoded(big, "WEBP", lossless=True), "WEBP")]
    for o in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        out.append((f"jpeg exif {o}", _encoded(_photo_like(640, 400, seed=o), "JPEG", exif=exif.tobytes()), "JPEG"))
    return out


CASES = _cases()


def test_simplejpeg_is_installed():
    """A required dependency (setup.py, constraints.txt; scripts/bootstrap.sh installs it): without it JPEGs
    silently take Pillow's slower path."""
    assert decoders.simplejpeg is not None, "simplejpeg is missing: pip install -c constraints.txt simplejpeg"


@pytest.mark.parametrize("name,data,kind", CASES, ids=[c[0] for c in CASES])
def test_fast_decoders_give_pillows_pixels(name, data, kind):
    """Each fast decoder takes its format and gives Pillow's decoded pixels bit for bit (the JPEG at
    the same DCT scale as Pillow's draft), EXIF orientation included, and the same reported size."""
    img, w, h, _ = open_checked(data)
    assert decoders.fast_format(img, data) == kind
    for size in (224, 160):
        got = _oriented(data, size)
        pil, pw, ph = decode_image(data, draft_size=size)
        want = np.asarray(pil)
        assert got.shape == want.shape and (w, h) == (pw, ph)
        assert np.array_equal(got, want), (name, size, np.abs(got.astype(int) - want).max())


@pytest.mark.parametrize("mode", ["squash", "letterbox"])
@pytest.mark.parametrize("name,data,kind", CASES[::3] + CASES[-7:], ids=[c[0] for c in CASES[::3] + CASES[-7:]])
def test_fast_prepare_is_within_two_grey_levels_of_pillows(name, data, kind, mode):
    """torch's antialiased bilinear resize (the orientation applied after it) against Pillow's decode +
    resize: every value within 2/255, on average within 0.05/255 (0.25/255 where the orientation
    transposes the image: the two passes then run in the other order), for up- and downscaling."""
    mean_tol = 0.25 if name in ("jpeg exif 5", "jpeg exif 6", "jpeg exif 7", "jpeg exif 8") else 0.05
    for fast, slow in zip(prepare(data, (224, 160), mode)[0], prepare(data, (224, 160), mode, decoder="pillow")[0]):
        assert fast.shape == slow.shape and fast.dtype == torch.float32
        diff = (fast - slow).abs() * 255
        assert float(diff.max()) <= 2.001 and float(diff.mean()) < mean_tol, (name, float(diff.max()), float(diff.mean()))


def test_the_rest_takes_pillows_path_with_the_same_result_or_error(tmp_path):
    """CMYK, alpha, 16-bit, animation, BMP, TIFF: Pillow decodes (the fast path hands over); broken files
    give exactly the Pillow path's error reason."""
    zoo = make_zoo(str(tmp_path))
    for name, expected in EXPECTED.items():
        data = open(zoo[name], "rb").read()
        if expected != "ok":
            with pytest.raises(ImageError) as fast:
                prepare(data, (64,))
            with pytest.raises(ImageError) as slow:
                prepare(data, (64,), decoder="pillow")
            assert str(fast.value) == str(slow.value) and expected in str(fast.value)
            continue
        if name in ("cmyk.jpg", "alpha.png", "deep16.png", "anim.gif", "photo.bmp", "photo.tiff"):
            assert decoders.fast_format(open_checked(data)[0], data) is None, name
        x, w, h, orientation = decode_pixels(data, draft_size=64)
        want = np.asarray(decode_image(data, draft_size=64)[0])
        assert np.array_equal(decoders.orient(x, orientation).permute(1, 2, 0).numpy(), want), name


def test_a_file_the_fast_decoder_refuses_falls_back_to_pillow():
    """A JPEG with junk between its markers: libjpeg warns, simplejpeg (strict) refuses, and Pillow (which
    decodes it, as before) gives the pixels: no new error rows."""
    data = _encoded(_photo_like(200, 150), "JPEG", quality=90)
    sos = data.index(b"\xff\xda")
    damaged = data[:sos] + b"\x00\x11\x22" + data[sos:]     # extraneous bytes before a marker
    assert decoders.decode_fast(damaged, "JPEG", 200, 150, 64) is None
    got = _oriented(damaged, 64)
    assert np.array_equal(got, np.asarray(decode_image(damaged, draft_size=64)[0]))


def test_jpeg_scale_is_pillows_draft():
    for w, h in ((223, 500), (448, 448), (447, 900), (1792, 1800), (5000, 300), (4000, 3000)):
        img = Image.new("RGB", (w, h))
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        im = Image.open(io.BytesIO(buf.getvalue()))
        im.draft("RGB", (224, 224))
        s = decoders.jpeg_scale(w, h, 224)
        assert im.size == (-(-w // s), -(-h // s)), (w, h, s)


def test_orient_matches_exif_transpose():
    arr = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    for o in range(1, 9):
        img = Image.fromarray(arr)
        exif = img.getexif()
        exif[0x0112] = o
        img.info["exif"] = exif.tobytes()
        from PIL import ImageOps

        want = np.asarray(ImageOps.exif_transpose(img))
        got = decoders.orient(torch.from_numpy(arr).permute(2, 0, 1), o).permute(1, 2, 0).numpy()
        assert np.array_equal(got, want), o


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="unknown preprocess.decoder 'magic'"):
        prepare(_encoded(_photo(), "PNG"), (64,), decoder="magic")


# ---------------------------------------------------------------------------------------------
# the look-ahead map
def test_ordered_map_keeps_order_and_results():
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.004, 60)

    def slow_square(i: int) -> int:
        time.sleep(delays[i])
        return i * i

    assert list(ordered_map(slow_square, range(60), workers=4, ahead=8)) == [i * i for i in range(60)]


def test_ordered_map_runs_ahead_on_several_threads():
    """Two items decode at the same time (a barrier that one thread alone could never pass), and the
    work runs before the consumer asks for it."""
    barrier = threading.Barrier(2, timeout=10)
    started = []

    def work(i: int) -> int:
        started.append(i)
        if i < 2:
            barrier.wait()
        return i

    gen = ordered_map(work, range(10), workers=2, ahead=6)
    assert next(gen) == 0
    deadline = time.monotonic() + 10
    while len(started) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(started) >= 6          # read ahead while the consumer did nothing
    assert list(gen) == list(range(1, 10))


def test_ordered_map_raises_in_place_and_stops_its_threads():
    def fn(i: int) -> int:
        if i == 5:
            raise KeyError("five")
        return i

    def items():
        yield from range(3)
        raise OSError("listing broke")

    before = {t.name for t in threading.enumerate()}
    out = []
    with pytest.raises(KeyError):
        for v in ordered_map(fn, range(100), workers=3, ahead=4):
            out.append(v)
    assert out == [0, 1, 2, 3, 4]
    assert list(ordered_map(fn, range(3), 2, 2)) == [0, 1, 2]
    got = []
    with pytest.raises(OSError, match="listing broke"):
        for v in ordered_map(fn, items(), workers=2, ahead=2):
            got.append(v)
    assert got == [0, 1, 2]
    gen = ordered_map(fn, range(1000), workers=2, ahead=3)       # the consumer stops early
    assert next(gen) == 0
    gen.close()
    time.sleep(0.05)
    assert {t.name for t in threading.enumerate()} - before == set()


def test_prepare_items_with_workers_gives_the_inline_results(tmp_path):
    zoo = make_zoo(str(tmp_path))
    rows = [(name, zoo[name]) for name in sorted(EXPECTED)] + [("gone", str(tmp_path / "missing.jpg"))]
    inline = list(prepare_items(rows, (64, 48), "squash", DecodePolicy()))
    ahead = list(prepare_items(rows, (64, 48), "squash", DecodePolicy(), workers=2, ahead=3))
    assert [(o[0], o[1], o[3], o[4], o[5]) for o in inline] == [(o[0], o[1], o[3], o[4], o[5]) for o in ahead]
    for a, b in zip(inline, ahead):
        assert (a[2] is None) == (b[2] is None)
        if a[2] is not None:
            assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_a_png_with_an_icc_profile_goes_through_pillow_with_the_same_pixels():
    """libpng prints warnings on some ICC profiles straight to stderr (past the console's capture, from
    a Spark worker): a PNG with an iCCP chunk takes Pillow's path, which gives the same pixels."""
    from PIL import ImageCms

    rgb = _photo(48, 40)
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    plain, with_icc = io.BytesIO(), io.BytesIO()
    rgb.save(plain, "PNG")
    rgb.save(with_icc, "PNG", icc_profile=profile)
    plain, with_icc = plain.getvalue(), with_icc.getvalue()
    assert b"iCCP" in with_icc and b"iCCP" not in plain
    assert decoders.fast_format(open_checked(plain)[0], plain) == "PNG"
    assert decoders.fast_format(open_checked(with_icc)[0], with_icc) is None
    fast = decode_pixels(with_icc, DecodePolicy(), draft_size=64)[0]
    assert torch.equal(fast, decode_pixels(plain, DecodePolicy(), draft_size=64)[0])


def _png_with_chunk(data: bytes, kind: bytes, payload: bytes, before: bytes = b"IEND") -> bytes:
    """``data`` (a PNG) with a chunk ``kind`` inserted before the first ``before`` chunk."""
    import zlib

    at = data.index(before) - 4
    chunk = len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")
    return data[:at] + chunk + data[at:]


def test_png_chunks_walks_the_chunk_list_not_the_compressed_bytes():
    """``png_chunks`` finds eXIf / iCCP by the chunk list: the letters inside compressed data (or a
    text chunk) are not a chunk, so such a PNG keeps the fast path; a real eXIf chunk (after the pixels,
    where Pillow finds it) still takes Pillow's path and its orientation; a cut-short file is None."""
    plain = _encoded(_photo_like(64, 48), "PNG")
    assert decoders.png_chunks(plain) == {b"IHDR", b"IDAT", b"IEND"}
    decoy = _png_with_chunk(plain, b"tEXt", b"note\x00eXIf iCCP")
    assert b"eXIf" in decoy and decoders.png_chunks(decoy) == {b"IHDR", b"IDAT", b"tEXt", b"IEND"}
    img, w, h, orientation = open_checked(decoy)
    assert orientation == 1 and decoders.fast_format(img, decoy) == "PNG"
    assert torch.equal(decode_pixels(decoy, draft_size=64)[0], decode_pixels(plain, draft_size=64)[0])
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _png_with_chunk(plain, b"eXIf", exif.tobytes())
    assert b"eXIf" in decoders.png_chunks(rotated)
    img, w, h, orientation = open_checked(rotated)
    assert (w, h, orientation) == (48, 64, 6) and decoders.fast_format(img, rotated) is None
    assert decode_pixels(rotated, draft_size=64)[0].shape == (3, 64, 48)
    assert decoders.png_chunks(plain[:-12]) is None and decoders.png_chunks(plain[:30]) is None
    assert decoders.fast_format(Image.open(io.BytesIO(plain[:-12])), plain[:-12]) is None
