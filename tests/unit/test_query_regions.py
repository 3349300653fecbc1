"""Query regions: the region names and boxes, the content box on real photos in generated frames,
the per-image merge of the search, the chunk plan that keeps an image's rows together, and the
false-match rates with regions (the pipeline on both engines: tests/integration/test_query_regions.py)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from retrieval.extract import regions as R
from retrieval.search import calibrate
from retrieval.search import regions as SR
from retrieval.search.queries import plan_chunks


def _photo(name: str = "astronaut", size: tuple[int, int] | None = None) -> Image.Image:
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    return img.resize(size) if size else img


def framed(photo: Image.Image, canvas: tuple[int, int], at: tuple[int, int], text: bool = True) -> Image.Image:
    """``photo`` pasted at ``at`` onto a flat page with a header bar, rules and lines of text (a
    screenshot-like frame)."""
    page = Image.new("RGB", canvas, (246, 247, 249))
    d = ImageDraw.Draw(page)
    d.rectangle([0, 0, canvas[0], 40], fill=(255, 255, 255))
    d.line([0, 41, canvas[0], 41], fill=(200, 200, 205))
    if text:        # a name and a caption line above the photo, a few words below: sparse, as on a page
        d.text((at[0], max(50, at[1] - 40)), "John Doe", fill=(20, 20, 20))
        d.text((at[0], max(62, at[1] - 22)), "a minute ago  -  shared a photo", fill=(120, 120, 120))
        d.text((20, 12), "network", fill=(20, 20, 20))
    page.paste(photo, at)
    return page


def test_region_names_are_checked():
    assert R.check_names(["content", "center70", "grid2"]) is None
    assert R.check_names([]) is None
    assert "unknown region" in R.check_names(["middle"])
    assert "30..95" in R.check_names(["center20"])
    assert "2..4" in R.check_names(["grid5"])
    assert "twice" in R.check_names(["content", "content"])
    assert "list" in R.check_names("content")


def test_fixed_regions_and_labels():
    img = _photo(size=(400, 300))
    got = R.boxes(img, ["center70", "grid2"])
    assert [lab for lab, _ in got][0] == "center70:0.150,0.150,0.850,0.850"
    assert len(got) == 5                                   # one centre crop + 2 x 2 tiles
    tiles = [b for _, b in got[1:]]
    assert tiles[0] == pytest.approx((0, 0, 2 / 3, 2 / 3)) and tiles[-1] == pytest.approx((1 / 3, 1 / 3, 1, 1))
    for lab, box in got:
        name, parsed = R.parse_label(lab)
        assert parsed == pytest.approx(box, abs=1e-3) and name in ("center70", "grid2")
    assert R.crop(img, (0.15, 0.15, 0.85, 0.85)).size == (280, 210)
    assert R.parse_label(None) is None and R.parse_label("content:oops") is None
    assert R.parse_label("content:0.5,0.5,0.2,0.9") is None          # not a box


@pytest.mark.parametrize("name,canvas,at", [("astronaut", (900, 700), (150, 260)),
                                            ("coffee", (600, 1000), (20, 420)),
                                            ("chelsea", (1000, 620), (300, 90))])
def test_content_box_finds_the_photo_in_its_frame(name, canvas, at):
    photo = _photo(name, (420, 300) if canvas[0] > 700 else (560, 400))
    page = framed(photo, canvas, at)
    box = R.content_box(page)
    want = (at[0] / canvas[0], at[1] / canvas[1], (at[0] + photo.width) / canvas[0],
            (at[1] + photo.height) / canvas[1])
    assert box is not None
    assert box == pytest.approx(want, abs=0.05), (box, want)
    assert R.boxes(page, ["content"])[0][0].startswith("content:")


def test_content_box_of_a_padded_photo_and_none_without_borders():
    photo = _photo("astronaut", (300, 300))
    padded = Image.new("RGB", (500, 400), (0, 0, 0))
    padded.paste(photo, (100, 50))
    assert R.content_box(padded) == pytest.approx((0.2, 0.125, 0.8, 0.875), abs=0.04)
    for name in ("astronaut", "chelsea", "coffee"):       # nothing to trim: no content region
        assert R.content_box(_photo(name)) is None
        assert R.boxes(_photo(name), ["content"]) == []
    assert R.content_box(Image.new("RGB", (300, 200), (255, 255, 255))) is None    # blank


def test_merge_keeps_the_best_entry_per_gallery_image():
    # two images: rows 0 (whole), 1 (a region) | row 2 (whole, no region)
    starts = np.array([0, 2])
    ids = np.array([[10, 11, 12], [11, 13, -1], [10, -1, -1]])
    scores = np.array([[0.9, 0.5, 0.4], [0.8, 0.3, -np.inf], [0.7, -np.inf, -np.inf]], np.float32)
    key = scores - np.array([[0.0], [0.2], [0.0]], np.float32)     # the region's background level is higher
    m_ids, row, col = SR.merge(starts, scores, ids, key, k=3)
    # image 0: 10 (0.9, whole), 11 (region 0.8-0.2=0.6 > whole 0.5), 12 (0.4); 13 (0.1) is 4th
    assert m_ids.tolist() == [[10, 11, 12], [10, -1, -1]]
    assert row.tolist() == [[0, 1, 0], [2, -1, -1]] and col.tolist() == [[0, 0, 2], [0, -1, -1]]
    assert SR.take(scores, row, col, np.nan)[0].tolist() == pytest.approx([0.9, 0.8, 0.4])
    # ties: the whole image wins (the earlier row); then ids ascending
    m_ids, row, _ = SR.merge(np.array([0]), np.ones((2, 2)), np.array([[5, 4], [4, 6]]), np.ones((2, 2)), k=3)
    assert m_ids.tolist() == [[4, 5, 6]] and row.tolist() == [[0, 0, 1]]
    # nothing found
    m_ids, row, _ = SR.merge(np.array([0]), np.zeros((1, 2)), np.full((1, 2), -1), np.zeros((1, 2)), k=2)
    assert (m_ids == -1).all() and (row == -1).all()


def test_merge_chunk_carries_labels_and_region():
    q = pa.table({"image_id": ["a", "a", "b"], "uri": ["ua", "ua", "ub"],
                  "region": [None, "content:0.100,0.100,0.900,0.900", None]})
    ids = np.array([[1, 2], [2, 3], [4, -1]])
    scores = np.array([[0.9, 0.2], [0.6, 0.5], [0.3, -np.inf]], np.float32)
    labels = (pa.array(["g1", "g2", "g2", "g3", "g4"]), pa.array(["u1", "u2", "u2", "u3", "u4"]))
    queries, s, i, c, norm, region, lab = SR.merge_chunk(q, scores, ids, np.zeros_like(scores), None, 2, labels)
    assert queries.column("image_id").to_pylist() == ["a", "b"]
    assert i.tolist() == [[1, 2], [4, -1]] and s[0].tolist() == pytest.approx([0.9, 0.6])
    assert region.to_pylist() == [None, "content:0.100,0.100,0.900,0.900", None]
    assert lab[0].to_pylist() == ["g1", "g2", "g4"] and norm is None
    with pytest.raises(ValueError, match="first row"):
        SR.query_starts(["content:0,0,1,1", None])


def test_chunks_never_split_an_image():
    starts = [np.array([0, 3, 4, 7, 9])]               # images of 3, 1, 3, 2, 1 rows
    chunks = plan_chunks([10], 4, starts)
    assert [(c.start, c.stop) for c in chunks] == [(0, 4), (4, 7), (7, 10)]
    assert [(c.start, c.stop) for c in plan_chunks([10], 2, starts)] == [(0, 3), (3, 4), (4, 7), (7, 9), (9, 10)]
    assert [(c.start, c.stop) for c in plan_chunks([5], 2)] == [(0, 2), (2, 4), (4, 5)]   # without regions


def test_false_match_rates_count_every_region_as_a_try():
    rng = np.random.default_rng(0)
    null = rng.standard_normal(200_000) * 0.05
    one = calibrate.fit(null, gallery=1000, null_queries=100, background=2000)
    three = calibrate.fit(null, gallery=1000, null_queries=100, background=2000, regions=3)
    s = np.array([0.1, 0.15, 0.2])
    np.testing.assert_allclose(three.fmr_region(s), one.fmr(s))
    np.testing.assert_allclose(three.fmr(s), 1 - (1 - one.fmr(s)) ** 3)
    np.testing.assert_allclose(three.fmr_query(s), 1 - (1 - one.fmr(s)) ** 3000)
    assert three.threshold(0.01) > one.threshold(0.01)
    assert calibrate.NullTail.from_manifest(three.describe()).regions == 3


def test_region_margin_lets_a_region_win_only_by_more_than_the_margin():
    """``search.region_margin``: a region row's merge key is its score minus the margin; the score
    written is the region's own."""
    q = pa.table({"image_id": ["a", "a"], "uri": ["ua", "ua"], "region": [None, "center70:0.150,0.150,0.850,0.850"]})
    ids = np.array([[1, 2], [2, 3]])
    scores = np.array([[0.9, 0.2], [0.6, 0.5]], np.float32)

    def merged(margin, norm=None):
        _, s, i, _, n, region, _ = SR.merge_chunk(q, scores, ids, np.zeros_like(scores), norm, 3, margin=margin)
        return i[0].tolist(), s[0].tolist(), region.to_pylist()

    r = q["region"][1].as_py()
    i, s, region = merged(0.0)
    assert i == [1, 2, 3] and s == pytest.approx([0.9, 0.6, 0.5]) and region == [None, r, r]
    # 0.3: the region still wins image 2 (0.6 - 0.3 > 0.2) and keeps its own score; image 3 ranks by 0.5 - 0.3
    i, s, region = merged(0.3)
    assert i == [1, 2, 3] and s == pytest.approx([0.9, 0.6, 0.5]) and region[1] is not None
    # 0.45: the whole image's 0.2 wins image 2 (0.6 - 0.45 < 0.2); image 3 (0.5 - 0.45) still ranks third
    i, s, region = merged(0.45)
    assert i == [1, 2, 3] and s == pytest.approx([0.9, 0.2, 0.5]) and region == [None, None, r]
    # with normalised scores the margin applies to norm_score (the merge key)
    norm = scores - np.array([[0.0], [0.1]], np.float32)            # the region's background level is higher
    _, s, i, _, n, region, _ = SR.merge_chunk(q, scores, ids, np.zeros_like(scores), norm, 3, margin=0.45)
    assert i[0].tolist() == [1, 2, 3] and n[0].tolist() == pytest.approx([0.9, 0.2, 0.4])
    assert region.to_pylist() == [None, None, r]
    _, _, i, _, n, region, _ = SR.merge_chunk(q, scores, ids, np.zeros_like(scores), norm, 3, margin=0.0)
    assert n[0].tolist() == pytest.approx([0.9, 0.5, 0.4]) and region.to_pylist() == [None, r, r]


def test_region_margin_is_checked():
    from retrieval import config

    assert config.load(sets=["search.region_margin=0.1"])["search.region_margin"] == 0.1
    for bad in ("search.region_margin=-0.1", "search.region_margin=2", "search.region_margin=often"):
        with pytest.raises(config.ConfigError, match="search.region_margin"):
            config.load(sets=[bad])
