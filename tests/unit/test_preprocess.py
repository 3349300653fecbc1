import pytest
import torch
from PIL import Image

from retrieval.extract.preprocess import DecodePolicy, ImageError, decode_image, prepare, prepare_items, resize
from tests.imagezoo import EXPECTED, make_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(str(tmp_path_factory.mktemp("zoo")))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_zoo_file_is_processed_or_gets_a_clear_reason(zoo, name):
    data = open(zoo[name], "rb").read()
    if EXPECTED[name] == "ok":
        (hi, lo), w, h = prepare(data, (224, 160))
        assert hi.shape == (3, 224, 224) and lo.shape == (3, 160, 160)
        assert hi.dtype == torch.float32 and 0.0 <= hi.min() and hi.max() <= 1.0
        assert (w, h) in ((96, 64), (64, 96))
    else:
        with pytest.raises(ImageError, match=EXPECTED[name].replace("(", r"\(").replace(")", r"\)")):
            prepare(data, (224, 160))


def test_exif_orientation_is_applied(zoo):
    img, w, h = decode_image(open(zoo["exif_rot.jpg"], "rb").read())
    assert (w, h) == (64, 96) and img.size == (64, 96)


def test_sixteen_bit_is_scaled_not_clipped(zoo):
    img, _, _ = decode_image(open(zoo["deep16.png"], "rb").read())
    ref = Image.open(zoo["gray.jpg"]).convert("L")
    got = img.convert("L")
    # a clipped 16-bit conversion would be almost all white
    assert abs(sum(got.getdata()) / got.size[0] / got.size[1] - sum(ref.getdata()) / ref.size[0] / ref.size[1]) < 10


def test_alpha_is_composited_on_white(tmp_path):
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    img, _, _ = decode_image((tmp_path / "clear.png").read_bytes())
    assert img.getpixel((5, 5)) == (255, 255, 255)


def test_byte_cap(zoo):
    data = open(zoo["gray.jpg"], "rb").read()
    with pytest.raises(ImageError, match="file too large"):
        decode_image(data, DecodePolicy(max_bytes=100))


def test_squash_keeps_whole_image_and_letterbox_pads():
    img = Image.new("RGB", (200, 100), (0, 0, 255))
    img.paste((255, 0, 0), (190, 0, 200, 100))   # a red strip on the right edge
    sq = resize(img, 64, "squash")
    assert sq.size == (64, 64) and sq.getpixel((63, 32))[0] > 200   # the edge content survives
    lb = resize(img, 64, "letterbox")
    assert lb.size == (64, 64) and lb.getpixel((32, 2)) == (124, 116, 104)  # padded band


def test_prepare_items_is_the_loop_extract_and_fit_share(zoo, tmp_path):
    """One row out per row in, in order: the tensors ``prepare`` gives, or the error row's reason (a file
    that cannot be read, an image that cannot be decoded)."""
    names = sorted(EXPECTED)
    rows = [(name, zoo[name]) for name in names] + [("gone", str(tmp_path / "missing.jpg"))]
    out = list(prepare_items(rows, (64, 48), "letterbox", DecodePolicy()))
    assert [(o[0], o[1]) for o in out] == rows
    for (image_id, _, tensors, w, h, err), name in zip(out, names):
        if EXPECTED[name] == "ok":
            want, ww, wh = prepare(open(zoo[name], "rb").read(), (64, 48), "letterbox")
            assert err is None and (w, h) == (ww, wh)
            assert [t.shape for t in tensors] == [(3, 64, 64), (3, 48, 48)]
            assert all(torch.equal(a, b) for a, b in zip(tensors, want))
        else:
            assert tensors is None and err is not None and EXPECTED[name] in err, (name, err)
    assert out[-1][2] is None and out[-1][5] == "missing file: not found"
