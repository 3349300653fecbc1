"""The report's threshold choice (retrieval/report/job.py: choose_threshold / settings_from): a
target false-match rate when the results carry rates, the measured precision when an evaluation is
given, the fixed default with a note when neither; a configured number as is."""
from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval import config as config_mod
from retrieval.report.job import DEFAULT_THRESHOLD, settings_from
from retrieval.search import calibrate


def _tail() -> calibrate.NullTail:
    rng = np.random.default_rng(5)
    return calibrate.fit(0.1 * rng.standard_normal(200_000), gallery=5000, null_queries=400, background=500)


def _manifest(normalised: bool, calibration: dict | None) -> dict:
    params = {"normalize": {"background": "/bg", "background_size": 500, "k": 10, "beta": 0.5} if normalised else None}
    return {"stage": "search", "params": params, "calibration": calibration}


def test_auto_with_false_match_rates_uses_the_target_rate():
    tail = _tail()
    for target in (0.1, 0.01, 0.001):
        cfg = config_mod.load(sets=[f"report.target_fmr={target}"])
        st = settings_from(cfg, _manifest(True, tail.describe()))
        assert st.threshold_source == "target_fmr" and st.score_column == "norm_score"
        assert st.threshold == pytest.approx(tail.threshold(target), abs=1e-6)
        # the flagged rows are exactly those whose estimated per-query rate is <= the target
        assert float(tail.fmr_query(st.threshold)) == pytest.approx(target, rel=1e-3)
        assert f"estimated probability of {target:g}" in st.threshold_note and "5,000" in st.threshold_note
    # a stricter target flags at a higher score
    hi = settings_from(config_mod.load(sets=["report.target_fmr=0.001"]), _manifest(True, tail.describe()))
    lo = settings_from(config_mod.load(sets=["report.target_fmr=0.1"]), _manifest(True, tail.describe()))
    assert hi.threshold > lo.threshold


def test_an_evaluation_still_wins_over_the_rates(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"stage": "evaluate", "thresholds": {"score": "norm_score", "precision": {"0.9": 0.3125, "0.95": 0.4}}}))
    cfg = config_mod.load(overrides={"report.threshold": {"from_evaluation": str(metrics), "precision": 0.95}})
    st = settings_from(cfg, _manifest(True, _tail().describe()))
    assert st.threshold_source == "evaluation" and st.threshold == 0.4
    assert "95% precision" in st.threshold_note


def test_no_rates_and_no_evaluation_keep_the_fixed_default_with_a_note():
    cfg = config_mod.load()
    for manifest, column in ((_manifest(False, None), "score"), (_manifest(True, None), "norm_score")):
        st = settings_from(cfg, manifest)
        assert st.threshold == DEFAULT_THRESHOLD == 0.75 and st.threshold_source == "default"
        assert st.score_column == column and "not a probability" in st.threshold_note
        assert "search.normalize.background" in st.threshold_note
    # rates on another score (a manifest without normalisation) are not used for the raw cosine
    st = settings_from(cfg, _manifest(False, _tail().describe()))
    assert st.threshold_source == "default"


def test_a_configured_number_is_kept_and_explained():
    tail = _tail()
    st = settings_from(config_mod.load(sets=["report.threshold=0.3"]), _manifest(True, tail.describe()))
    assert st.threshold == 0.3 and st.threshold_source == "configured"
    assert f"{float(tail.fmr_query(0.3)):.2g}" in st.threshold_note
    st = settings_from(config_mod.load(sets=["report.threshold=0.8"]), _manifest(False, None))
    assert st.threshold == 0.8 and "cosine" in st.threshold_note
