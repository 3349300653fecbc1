"""Geometric verification (search.geometric, retrieval/search/geometric.py): real OpenCV ORB/SIFT on
real photos (scikit-image), the combination rule and its re-ordering, recorded errors, the config."""
from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from retrieval import config
from retrieval.schema import RESULT_SCHEMA, conform_results
from retrieval.search.geometric import (RUN_TOP, Geometric, Matcher, apply, count_rows, require_cv2, rows_to_check,
                                        run_top, verify_table)

pytest.importorskip("cv2")


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("geo")
    a = _photo("astronaut")
    a.save(root / "astronaut.jpg", quality=90)
    _photo("coffee").save(root / "coffee.jpg", quality=90)
    # a copy: cropped, rotated 12 degrees, scaled down, re-encoded
    a.crop((40, 30, 480, 470)).rotate(12, expand=True).resize((300, 300)).save(root / "copy.jpg", quality=70)
    a.transpose(Image.FLIP_LEFT_RIGHT).resize((360, 360)).save(root / "mirror.jpg", quality=80)
    (root / "broken.jpg").write_bytes(b"not an image at all")
    return {n: str(root / f"{n}.jpg") for n in ("astronaut", "coffee", "copy", "mirror", "broken")}


@pytest.mark.parametrize("method", ["orb", "sift"])
def test_a_copy_has_many_inliers_an_unrelated_photo_few(images, method):
    m = Matcher(Geometric(top=5, method=method, flip=False))
    copy = m.inliers(images["copy"], images["astronaut"])
    other = m.inliers(images["copy"], images["coffee"])
    assert copy >= 40 and other <= 12, (copy, other)
    assert m.inliers(images["astronaut"], images["astronaut"]) > copy       # the image itself: more still


def test_flip_finds_a_mirrored_copy_and_affine_model_counts_too(images):
    plain = Matcher(Geometric(top=5, flip=False)).inliers(images["mirror"], images["astronaut"])
    flipped = Matcher(Geometric(top=5, flip=True)).inliers(images["mirror"], images["astronaut"])
    assert plain <= 12 < 40 <= flipped, (plain, flipped)
    assert Matcher(Geometric(top=5, model="affine")).inliers(images["copy"], images["astronaut"]) >= 40


def test_features_are_cached_per_image(images):
    m = Matcher(Geometric(top=5, cache=2, flip=False))
    for _ in range(3):
        m.inliers(images["copy"], images["astronaut"])
    assert m.described == 2
    m.inliers(images["mirror"], images["coffee"])        # two more: the LRU keeps 2
    assert m.described == 4 and len(m.cache) == 2


def test_early_exit_and_ransac_skip_save_work_not_boost(images):
    """A match reaching ``cap`` ends the row (the mirror is never described); a pair with fewer
    ratio-test matches than ``min_inliers`` skips RANSAC and counts 0; the boost is the same."""
    m = Matcher(Geometric(top=5, cap=20, early=True))
    full = Matcher(Geometric(top=5, cap=20, early=False))
    n, n_full = m.inliers(images["copy"], images["astronaut"]), full.inliers(images["copy"], images["astronaut"])
    assert 20 <= n <= n_full and m.g.boosts(np.array([n])) == full.g.boosts(np.array([n_full]))
    assert (images["copy"], True, None) not in m.cache and (images["copy"], True, None) in full.cache
    assert full.inliers(images["mirror"], images["astronaut"]) >= 40          # mirrored: the plain match fails first
    strict = Matcher(Geometric(top=5, min_inliers=10_000))
    assert strict.inliers(images["copy"], images["astronaut"]) == 0


def test_gate_verifies_only_rows_whose_score_could_matter(images):
    t = _table([("q", 1, "a", 0.9, images["copy"], images["astronaut"]),
                ("q", 2, "b", 0.5, images["copy"], images["coffee"]),
                ("q", 3, "c", 0.35, images["copy"], images["astronaut"])])
    g = Geometric(top=3, gate=0.1)                     # on norm_score (score - 0.3 here): rows 1 and 2
    assert rows_to_check(t, g).tolist() == [True, True, False]
    out, stats = verify_table(t, g, Matcher(g))
    assert stats["geometric_rows"] == 2 and out.column("inliers").to_pylist()[2] is None
    no_norm = t.set_column(t.schema.get_field_index("norm_score"), "norm_score", pa.nulls(3, pa.float32()))
    assert rows_to_check(no_norm, Geometric(top=2, gate=0.4)).tolist() == [True, True, False]   # on score


def _table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows))
    return conform_results(pa.table({
        "query_id": list(cols[0]), "rank": pa.array(cols[1], pa.int32()), "gallery_id": list(cols[2]),
        "score": pa.array(cols[3], pa.float32()), "coarse_score": pa.array(cols[3], pa.float32()),
        "query_uri": list(cols[4]), "gallery_uri": list(cols[5]),
        "norm_score": pa.array([s - 0.3 for s in cols[3]], pa.float32())}))


def test_rule_boosts_verified_rows_and_reorders_each_query():
    t = _table([("q1", 1, "a", 0.9, "/q1", "/a"), ("q1", 2, "b", 0.8, "/q1", "/b"), ("q1", 3, "c", 0.7, "/q1", "/c"),
                ("q2", 1, "a", 0.6, "/q2", "/a"), ("q2", 2, "d", 0.5, "/q2", "/d")])
    g = Geometric(top=2, min_inliers=10, boost=0.4, cap=20)
    assert g.boosts(np.array([-1, 5, 10, 20, 100])) == pytest.approx([0, 0, 0.2, 0.4, 0.4])
    out = apply(t, np.array([3, 30, -1, -1, 15]), [None, None, None, "cannot read gallery image /a: x", None], g)
    d = out.to_pydict()
    assert out.schema.equals(RESULT_SCHEMA)
    assert d["gallery_id"] == ["b", "a", "c", "d", "a"]          # q1: b verified above a; q2: d above a
    assert d["rank"] == [1, 2, 3, 1, 2]
    assert d["score"] == pytest.approx([1.2, 0.9, 0.7, 0.8, 0.6])
    assert d["norm_score"] == pytest.approx([0.9, 0.6, 0.4, 0.5, 0.3])
    assert d["inliers"] == [30, 3, None, 15, None]
    assert d["geometric_error"] == [None, None, None, None, "cannot read gallery image /a: x"]
    assert d["fmr"] == [None] * 5                               # the descriptor's rates, untouched


def test_unreadable_images_are_recorded_not_raised(images):
    g = Geometric(top=3, flip=False)
    m = Matcher(g)
    qu = [images["copy"], images["copy"], images["broken"], images["copy"]]
    gu = [images["astronaut"], images["broken"], images["astronaut"], "/nonexistent/x.jpg"]
    n, errors = count_rows(m, qu, gu, np.array([True, True, True, False]))
    assert n[0] >= 40 and n[1] == n[2] == n[3] == -1
    assert errors[0] is None and errors[3] is None                      # not checked: no error either
    assert errors[1].startswith(f"cannot read gallery image {images['broken']}")
    assert errors[2].startswith(f"cannot read query image {images['broken']}")
    t = _table([("q", 1, "a", 0.5, images["copy"], images["astronaut"]),
                ("q", 2, "b", 0.6, images["copy"], "/nonexistent/x.jpg")])
    out, stats = verify_table(t, g, m)
    assert stats["geometric_rows"] == 1 and stats["geometric_errors"] == 1
    assert out.column("gallery_id").to_pylist() == ["a", "b"]
    assert "FileNotFoundError" in out.column("geometric_error").to_pylist()[1]


def test_config_off_by_default_checked_and_cv2_required(monkeypatch):
    assert run_top("auto") == RUN_TOP == 10 and run_top(3.0) == 3 and run_top(10, verify=False) == 0
    assert Geometric.from_config({"top": "auto"}) is None           # auto: off outside retrieval run
    assert Geometric.from_config(config.load().search.geometric) is None
    g = Geometric.from_config(config.load(sets=["search.geometric.top=5", "search.geometric.method=sift"]).search.geometric)
    assert (g.top, g.method, g.flip) == (5, "sift", True)
    for bad in ("search.geometric.method=surf", "search.geometric.top=-1", "search.geometric.ratio=1.5"):
        with pytest.raises(ValueError, match="search.geometric"):
            config.load(sets=[bad])
    with pytest.raises(ValueError, match="unknown key"):
        Geometric.from_config({"top": 3, "inlier": 5})
    monkeypatch.setitem(sys.modules, "cv2", None)               # OpenCV not installed
    with pytest.raises(RuntimeError, match=r"retrieval\[verify\]"):
        require_cv2()
    with pytest.raises(RuntimeError, match="search.geometric.top=0"):
        Geometric.from_config({"top": 3})
    assert Geometric.from_config({"top": 0}) is None                # off: no OpenCV needed
    assert run_top("auto") == 0 and run_top(5) == 5 and run_top("auto", verify=False) == 0   # cv2 blocked here


def test_regions_match_the_query_region_cropped(tmp_path):
    """A photo shown small inside a screenshot-like page: the content region cropped at full
    resolution finds more inliers than the whole page downscaled to max_side."""
    from tests.unit.test_query_regions import framed

    photo = _photo("astronaut")
    photo.save(tmp_path / "astronaut.jpg", quality=90)
    small = photo.resize((240, 240))
    canvas, at = (1400, 1000), (600, 500)
    framed(small, canvas, at).save(tmp_path / "page.jpg", quality=90)
    label = (f"content:{at[0] / canvas[0]:.3f},{at[1] / canvas[1]:.3f},{(at[0] + 240) / canvas[0]:.3f},"
             f"{(at[1] + 240) / canvas[1]:.3f}")
    page, astro = str(tmp_path / "page.jpg"), str(tmp_path / "astronaut.jpg")
    whole = Matcher(Geometric(top=1, regions=False)).inliers(page, astro, label)
    m = Matcher(Geometric(top=1, regions=True))
    cropped = m.inliers(page, astro, label)
    assert cropped >= 40 and cropped > 2 * max(whole, 5), (whole, cropped)
    assert m.inliers(page, astro, None) == m.inliers(page, astro, "not a label") == whole   # no region: whole only
    t = _table([("page.jpg", 1, "a", 0.5, page, astro)])
    t = t.set_column(t.schema.get_field_index("query_region"), "query_region", pa.array([label]))
    out, _ = verify_table(t, Geometric(top=1, regions=True), m)
    assert out.column("inliers").to_pylist() == [cropped]
