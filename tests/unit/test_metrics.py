"""retrieval.metrics, the one truth reader and micro-AP of evaluate, report and training:
the truth CSV's rules, the 2021 ISC micro-AP (ties: wrong first) by hand, the operating points."""
from __future__ import annotations

import fsspec
import numpy as np
import pytest

from retrieval.metrics import micro_ap, operating_points, precision_recall, read_truth


def _truth(tmp_path, text: str, name: str = "truth.csv"):
    p = tmp_path / name
    p.write_text(text)
    return read_truth(str(p))


# ---------------------------------------------------------------------------------------------
# ground truth
def test_truth_rows_distractors_and_labels(tmp_path):
    truth = _truth(tmp_path, "query_id,gallery_id\na,g1\na,g2\nb,\nc,g1\na,g1\n")
    # several rows per query: all its true matches; an empty gallery_id: a distractor query
    assert truth.matches == {"a": {"g1", "g2"}, "b": set(), "c": {"g1"}}
    assert truth.n_pairs == 3                       # the repeated (a, g1) counts once
    assert truth.matching_queries == ["a", "c"] and truth.distractor_queries == ["b"]
    assert truth.label("a", "g2") is True and truth.label("b", "g1") is False
    assert truth.label("zz", "g1") is None          # not in the truth: unlabelled


def test_truth_columns_in_any_order_extra_columns_blank_lines(tmp_path):
    text = "\ufeffgallery_id, query_id ,note\r\ng1,a,first\r\n\r\n,,\r\n,b,no match\r\n"
    truth = _truth(tmp_path, text)
    assert truth.matches == {"a": {"g1"}, "b": set()}
    # a trailing empty cell is no extra column; any fsspec URL is read
    with fsspec.open("memory://metrics-test/truth.csv", "w") as fh:
        fh.write("query_id,gallery_id\nq1,g1,\nq2\n")
    assert read_truth("memory://metrics-test/truth.csv").matches == {"q1": {"g1"}, "q2": set()}


@pytest.mark.parametrize("text, message", [
    ("query,gallery\nq1,g1\n", r"line 1: the header .* \(missing column\(s\) \['query_id', 'gallery_id'\]\)"),
    ("", "header"),
    ("q1,g1\n", "header"),
    ("query_id,gallery_id,query_id\nq1,g1,q2\n", r"once each \(named more than once: \[.query_id.\]\)"),
    ("query_id,gallery_id\n,g1\n", "line 2: empty query_id"),
    # line numbers count blank lines and the lines of a quoted field
    ("query_id,gallery_id\nq1,g1\n\n  ,g2\n", "line 4: empty query_id"),
    ('query_id,gallery_id\n"q\n1",g1\n,g2\n', "line 4: empty query_id"),
    ("gallery_id,query_id\ng1,\n", "line 2: empty query_id"),
    ("query_id,gallery_id\nq1,g1,x\n", "line 2: expected 2 columns, got 3"),
])
def test_bad_truth_is_refused_naming_file_and_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as err:
        _truth(tmp_path, text, "bad_truth.csv")
    assert "bad_truth.csv" in str(err.value)


def test_missing_truth_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ground truth .*nope.csv"):
        read_truth(str(tmp_path / "nope.csv"))


# ---------------------------------------------------------------------------------------------
# micro-AP, precision / recall
# five predictions, four true pairs in the truth (one never predicted); input order puts the
# correct prediction before the wrong one at the tied score 0.8
SCORES = [0.5, 0.8, 0.9, 0.8, 0.7]
CORRECT = [True, True, True, False, False]


def test_precision_recall_ranks_wrong_first_among_ties():
    p, r, s = precision_recall(SCORES, CORRECT, 4)
    # ranked: 0.9 right, 0.8 WRONG, 0.8 right, 0.7 wrong, 0.5 right
    np.testing.assert_allclose(s, [0.9, 0.8, 0.8, 0.7, 0.5])
    np.testing.assert_allclose(p, [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    np.testing.assert_allclose(r, [1 / 4, 1 / 4, 2 / 4, 2 / 4, 3 / 4])
    with pytest.raises(ValueError, match="5 scores but 4 labels"):
        precision_recall(SCORES, CORRECT[:4], 4)


def test_micro_ap_by_hand_with_ties():
    ap = micro_ap(*precision_recall(SCORES, CORRECT, 4)[:2])
    # sum (R_i - R_{i-1}) * P_i: recall rises at ranks 1, 3 and 5
    assert ap == pytest.approx(1 / 4 * 1 + 1 / 4 * 2 / 3 + 1 / 4 * 3 / 5)
    # the right one first among the tie would give 1/4 + 1/4 + 1/4 * 3/5 = 0.65: not what ISC does
    assert ap != pytest.approx(0.65)
    # the input order does not matter
    perm = [3, 0, 4, 2, 1]
    assert micro_ap(*precision_recall(np.take(SCORES, perm), np.take(CORRECT, perm), 4)[:2]) == ap
    # every prediction right and every true pair found: 1
    assert micro_ap(*precision_recall([0.3, 0.2], [True, True], 2)[:2]) == pytest.approx(1.0)


def test_micro_ap_empty_cases_are_zero():
    p, r, s = precision_recall([], [], 3)                # no prediction
    assert len(p) == len(r) == len(s) == 0 and micro_ap(p, r) == 0.0
    assert micro_ap(*precision_recall([0.9, 0.1], [False, False], 0)[:2]) == 0.0   # no true pair


def test_operating_points():
    p, r, s = precision_recall(SCORES, CORRECT, 4)
    p_at_r, r_at_p = operating_points(p, r, s, (0.5, 0.75, 1.0), (0.6, 0.9))
    assert p_at_r == {"0.5": {"precision": round(2 / 3, 6), "threshold": 0.8},
                      "0.75": {"precision": 0.6, "threshold": 0.5},
                      "1.0": None}                       # never reached
    assert r_at_p == {"0.6": {"recall": 0.75, "threshold": 0.5},
                      "0.9": {"recall": 0.25, "threshold": 0.9}}
    e = np.array([])
    assert operating_points(e, e, e, (0.5,), (0.9,)) == ({"0.5": None},
                                                          {"0.9": {"recall": 0.0, "threshold": None}})


def test_training_evaluation_uses_the_same_micro_ap():
    import warnings

    import torch

    from retrieval.train.validation import head_metrics

    class Identity:   # heads that pass the pooled features through: scores are plain dot products
        def coarse_gallery(self, x):
            return x

        coarse_query = fine = coarse_gallery

    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[0.6, 0.6], [-1.0, 0.0]])   # q0 ties g0 (its true match) and g1; q1: a distractor
    pooled = {"g_hi": g, "g_lo": g, "q_hi": q, "q_lo": q}
    m = head_metrics(Identity(), pooled, np.array([0, -1]), shortlist=2)
    # the wrong (q0, g1) ranks before the right (q0, g0) at 0.6: precision 1/2 when recall reaches 1
    assert m["micro_ap"] == pytest.approx(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the recalls' mean of no query
        m = head_metrics(Identity(), pooled, np.array([-1, -1]), shortlist=2)
    assert np.isnan(m["micro_ap"]) and np.isnan(m["recall@1"])   # no query with a true match
