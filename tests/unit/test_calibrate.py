"""Estimated false-match rates (retrieval/search/calibrate.py) against known distributions, and the
version-2 result schema (retrieval/schema.py)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import norm

from retrieval.schema import (RESULT_REQUIRED, RESULT_SCHEMA, RESULT_SCHEMA_VERSION, conform_results,
                              result_schema_version)
from retrieval.search import calibrate


@pytest.fixture(scope="module")
def normal_tail():
    x = np.random.default_rng(0).standard_normal(1_000_000)
    return calibrate.fit(x, gallery=1000, null_queries=1000, background=1000)


def test_uniform_null_gives_the_uniform_survival_in_the_observed_range():
    u = np.random.default_rng(1).random(400_000)
    t = calibrate.fit(u, gallery=1, null_queries=400, background=1000)
    s = np.array([0.05, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999, 0.9999])
    # linear in log-rate between points 10 per decade apart (<= 6% off for a uniform), plus 3 sigmas of
    # the sampling error of a count of n x (1 - s)
    tol = 0.06 + 3 / np.sqrt(400_000 * (1 - s))
    assert np.all(np.abs(t.fmr(s) / (1 - s) - 1) <= tol)
    assert t.fmr(-0.5) == 1.0                      # below every null score: every unrelated image
    assert t.resolution == pytest.approx(1 / 400_000)
    s_a, p_a = t.anchor
    assert p_a == pytest.approx(calibrate.MIN_EXCEEDANCES / 400_000)
    assert s_a == pytest.approx(1 - p_a, abs=3e-5)


def test_normal_null_matches_the_normal_tail_and_extrapolates_conservatively(normal_tail):
    t = normal_tail
    z = np.array([0.0, 1.0, 2.0, 3.0, 3.5, 4.0])
    np.testing.assert_allclose(t.fmr(z), norm.sf(z), rtol=0.15)
    s_a, p_a = t.anchor
    assert p_a == pytest.approx(1e-5) and 4.1 < s_a < 4.5        # the 10th highest of 1e6 normals
    # beyond the resolution (1e-6) the exponential tail: above the true (lighter) normal tail,
    # but by less than an order of magnitude up to 5 sigma (rate ~3e-7)
    for zz in (4.6, 5.0, 5.3):
        assert norm.sf(zz) <= t.fmr(zz) <= 10 * norm.sf(zz)
    assert t.fmr(8.0) > 0 and t.fmr(8.0) < t.fmr(6.0) < t.resolution


def test_rate_is_continuous_and_non_increasing_in_the_score(normal_tail):
    t = normal_tail
    s = np.linspace(-6, 9, 20001)
    r = t.fmr(s)
    assert np.all(np.diff(r) <= 0)
    assert np.all((r >= 0) & (r <= 1))
    s_a, p_a = t.anchor
    assert t.fmr(s_a) == pytest.approx(p_a) and t.fmr(s_a + 1e-9) == pytest.approx(p_a, rel=1e-6)
    assert np.all(np.diff(t.fmr_query(s)) <= 0)
    assert math.isnan(float(t.fmr(np.nan)))


def test_per_query_rate_scales_with_the_gallery_and_regions(normal_tail):
    t = normal_tail
    s = 4.0
    p = float(t.fmr(s))
    assert float(t.fmr_query(s)) == pytest.approx(1 - (1 - p) ** 1000)
    assert float(t.fmr_query(6.0)) == pytest.approx(1000 * float(t.fmr(6.0)), rel=1e-3)   # small: G x fmr
    big = calibrate.NullTail(**{**t.__dict__, "gallery": 10_000_000})
    assert float(big.fmr_query(s)) > 0.99            # ten million comparisons: a false match is near-certain
    regions = calibrate.NullTail(**{**t.__dict__, "regions": 4})
    assert float(regions.fmr_query(6.0)) == pytest.approx(4 * float(t.fmr_query(6.0)), rel=1e-3)


@pytest.mark.parametrize("target", [0.5, 0.1, 0.01, 1e-3, 1e-5])
def test_threshold_inverts_the_per_query_rate(normal_tail, target):
    t = normal_tail
    thr = t.threshold(target)
    assert float(t.fmr_query(thr)) == pytest.approx(target, rel=1e-3)
    assert float(t.fmr_query(thr + 1e-3)) < target
    # the true per-query rate of a normal null at that threshold: never above the target when
    # extrapolated (conservative), within the sampling error when observed
    true = 1 - (1 - norm.sf(thr)) ** 1000
    assert true <= target * 1.2


def test_threshold_refuses_impossible_targets(normal_tail):
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="in \\(0, 1\\)"):
            normal_tail.threshold(bad)


def test_manifest_round_trip_keeps_the_rates(normal_tail):
    back = calibrate.NullTail.from_manifest(normal_tail.describe())
    s = np.linspace(-2, 7, 101)
    np.testing.assert_allclose(back.fmr(s), normal_tail.fmr(s), rtol=1e-5)
    assert back.threshold(0.01) == pytest.approx(normal_tail.threshold(0.01), abs=1e-5)
    with pytest.raises(ValueError, match="malformed"):
        calibrate.NullTail.from_manifest({"scores": [0.1]})


def test_too_few_pairs_are_refused():
    with pytest.raises(ValueError, match="too few"):
        calibrate.fit(np.arange(10.0), gallery=5, null_queries=1, background=10)
    with pytest.raises(ValueError, match="gallery"):
        calibrate.fit(np.arange(100.0), gallery=0, null_queries=1, background=100)


def test_null_scores_are_normalised_leave_one_out():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    b = rng.standard_normal((30, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    k, beta = 4, 0.5
    got = calibrate.null_scores(q, b, k, beta).reshape(7, 30)
    for i in range(7):
        for j in range(30):
            others = np.delete(b @ q[i], j)
            want = float(q[i] @ b[j]) - beta * np.sort(others)[::-1][:k].mean()
            assert got[i, j] == pytest.approx(want, abs=1e-5)
    assert calibrate.null_scores(q[:0], b, k, beta).size == 0


# --- the result schema, version 2 ---------------------------------------------------------------

def _v1_table() -> pa.Table:
    return pa.table({"query_id": ["q1", "q1"], "rank": pa.array([1, 2], pa.int32()), "gallery_id": ["g1", "g2"],
                     "score": pa.array([0.9, 0.5], pa.float32()), "coarse_score": pa.array([0.8, 0.4], pa.float32()),
                     "query_uri": ["/q1.jpg"] * 2, "gallery_uri": ["/g1.jpg", "/g2.jpg"],
                     "norm_score": pa.array([0.6, 0.2], pa.float32())})


def test_version_1_results_are_read_into_version_2(tmp_path):
    path = tmp_path / "v1.parquet"
    pq.write_table(_v1_table(), path)
    raw = pq.read_table(path)
    assert result_schema_version(raw.schema) == 1
    t = conform_results(raw)
    assert t.schema.equals(RESULT_SCHEMA) and result_schema_version(t.schema) == RESULT_SCHEMA_VERSION == 3
    assert t.column("score").to_pylist() == pytest.approx([0.9, 0.5])
    assert t.column("fmr").null_count == t.column("fmr_query").null_count == 2
    assert t.column("query_region").null_count == t.column("distance").null_count == 2
    assert t.column("signal").to_pylist() == ["descriptor", "descriptor"]
    # a file written before norm_score existed, too
    old = conform_results(_v1_table().drop(["norm_score"]))
    assert old.column("norm_score").null_count == 2 and old.schema.equals(RESULT_SCHEMA)


def test_version_2_columns_are_typed_and_kept(tmp_path):
    types = {f.name: str(f.type) for f in RESULT_SCHEMA}
    assert {k: types[k] for k in ("fmr", "fmr_query", "query_region", "signal", "distance")} == {
        "fmr": "double", "fmr_query": "double", "query_region": "string", "signal": "string", "distance": "int32"}
    assert set(RESULT_REQUIRED) < set(RESULT_SCHEMA.names) and "fmr" not in RESULT_REQUIRED
    t = _v1_table()
    t = t.append_column("fmr", pa.array([1e-7, 0.2])).append_column("fmr_query", pa.array([1e-4, 1.0]))
    t = t.append_column("query_region", pa.array(["0,0,10,10", None])).append_column("signal", pa.array(["descriptor"] * 2))
    t = t.append_column("distance", pa.array([None, 3], pa.int32())).append_column("extra", pa.array([1, 2]))
    out = conform_results(t)
    assert out.column_names == RESULT_SCHEMA.names                  # unknown columns dropped, order fixed
    assert out.column("fmr").to_pylist() == [1e-7, 0.2] and out.column("distance").to_pylist() == [None, 3]
    assert out.column("query_region").to_pylist() == ["0,0,10,10", None]
    pq.write_table(out, tmp_path / "v2.parquet")
    assert result_schema_version(pq.read_schema(tmp_path / "v2.parquet")) == 3     # written now: the current version
    assert out.column("inliers").null_count == out.column("geometric_error").null_count == 2   # version 3: not verified
