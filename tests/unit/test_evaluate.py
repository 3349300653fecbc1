"""Evaluation metrics (hand-computed cases), PR plot, exact brute force (the truth reader and
micro-AP themselves: test_metrics.py)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from retrieval import evaluate as ev
from tests import synthetic
from retrieval.extract.job import read_features
from retrieval.index import idmap
from retrieval.metrics import Truth, read_truth
from retrieval.schema import fine_matrix


def _truth(tmp_path, text: str) -> Truth:
    p = tmp_path / "truth.csv"
    p.write_text(text)
    return read_truth(str(p))


def test_metrics_by_hand(tmp_path):
    truth = _truth(tmp_path, "query_id,gallery_id\nq1,g1\nq2,g2\nq3,\n")
    assert truth.matches == {"q1": {"g1"}, "q2": {"g2"}, "q3": set()}
    rows = [("q1", 1, "g1", 0.9), ("q3", 1, "gx", 0.8), ("q2", 1, "g9", 0.7), ("q2", 2, "g2", 0.6)]
    q, r, g, s = zip(*rows)
    m, curve = ev.evaluate_results(q, r, g, s, truth, (1, 10), (0.5, 1.0), (0.5, 0.9))
    # ranked: correct, wrong, wrong, correct -> P = 1, 1/2, 1/3, 1/2 ; R = .5, .5, .5, 1
    assert m["micro_ap"] == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert m["recall@1"] == 0.5 and m["recall@10"] == 1.0
    np.testing.assert_allclose(curve["precision"], [1, 1 / 2, 1 / 3, 1 / 2])
    np.testing.assert_allclose(curve["recall"], [0.5, 0.5, 0.5, 1.0])
    assert m["precision_at_recall"]["0.5"] == {"precision": 1.0, "threshold": 0.9}
    assert m["precision_at_recall"]["1.0"] == {"precision": 0.5, "threshold": 0.6}
    assert m["recall_at_precision"]["0.9"] == {"recall": 0.5, "threshold": 0.9}
    assert m["counts"]["distractor_queries"] == 1 and m["counts"]["true_pairs"] == 2
    assert m["counts"]["predictions"] == 4 and m["counts"]["correct_predictions"] == 2


def test_ties_are_ranked_pessimistically_and_unknown_queries_left_out(tmp_path):
    truth = _truth(tmp_path, "query_id,gallery_id\nq1,g1\nq2,\n")
    # same score for a right and a wrong prediction: the wrong one counts first
    m, _ = ev.evaluate_results(["q1", "q2", "zz"], [1, 1, 1], ["g1", "g7", "g1"], [0.5, 0.5, 0.99], truth)
    assert m["micro_ap"] == pytest.approx(0.5)   # P after the correct one = 1/2, recall 0 -> 1
    assert m["counts"]["queries_not_in_truth"] == 1
    # a matching query that the search missed costs recall, not precision
    truth = _truth(tmp_path, "query_id,gallery_id\nq1,g1\nq2,g2\n")
    m, _ = ev.evaluate_results(["q1"], [1], ["g1"], [0.9], truth)
    assert m["micro_ap"] == pytest.approx(0.5) and m["recall@1"] == 0.5
    assert m["counts"]["matching_queries_without_results"] == 1
    # several true matches for one query: any of them counts as a hit
    truth = _truth(tmp_path, "query_id,gallery_id\nq1,g1\nq1,g2\n")
    m, _ = ev.evaluate_results(["q1", "q1"], [1, 2], ["g2", "g5"], [0.9, 0.8], truth)
    assert m["recall@1"] == 1.0 and m["micro_ap"] == pytest.approx(0.5)


def test_empty_results(tmp_path):
    truth = _truth(tmp_path, "query_id,gallery_id\nq1,g1\nq2,\n")
    m, curve = ev.evaluate_results([], [], [], [], truth)
    assert m["micro_ap"] == 0.0 and m["recall@1"] == 0.0
    assert m["precision_at_recall"]["0.5"] is None
    ev.plot_pr(curve, str(tmp_path / "empty.png"), "empty")
    assert (tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_is_a_png(tmp_path):
    _, curve = ev.evaluate_results(["q1", "q2"], [1, 1], ["g1", "g3"], [0.9, 0.4],
                                   _truth(tmp_path, "query_id,gallery_id\nq1,g1\nq2,g2\n"))
    ev.plot_pr(curve, str(tmp_path / "pr.png"), "t", extra=curve)
    data = (tmp_path / "pr.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_exact_search_equals_numpy_brute_force(tmp_path):
    spec = synthetic.SyntheticSpec(n_clusters=50, seed=3)
    coarse, fine = synthetic.gallery(3000, spec)
    url = str(tmp_path / "gal")
    synthetic.write_feature_output(url, coarse, fine, num_files=3, storage="int8", row_group_size=200)
    files = [f"{url}/part-{i:05d}.parquet" for i in range(3)]
    _, qf, _ = synthetic.queries(3000, 40, 40, spec)
    s, i = ev.exact_search(qf.astype(np.float32), files, 10, batch_rows=450, query_chunk=33)
    stored = fine_matrix(read_features(url, ["fine", "fine_scale"]))
    ref = qf.astype(np.float32) @ stored.T
    ref_order = np.argsort(-ref, axis=1)[:, :10]
    bounds = np.linspace(0, 3000, 4).astype(int)
    file_no = np.searchsorted(bounds, ref_order, side="right") - 1
    ref_ids = idmap.encode_ids(file_no, ref_order - bounds[file_no])
    np.testing.assert_allclose(s, np.take_along_axis(ref, ref_order, axis=1), atol=1e-5)
    assert (i[:, 0] == ref_ids[:, 0]).mean() == 1.0
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i, ref_ids)]) > 0.99   # ties aside


def test_compare_with_exact():
    res = pa.table({"query_id": ["a", "a", "a", "b", "b"], "rank": [1, 2, 3, 1, 2],
                    "gallery_id": ["x", "y", "z", "u", "v"]})
    out = ev.compare_with_exact(res, ["a", "b", "c"], [["x", "z", "w"], ["v", "u", "t"], []], 3)
    assert out["queries"] == 2
    assert out["kept_at_k"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert out["rank1_agreement"] == 0.5


def test_per_kind_figures_when_the_truth_names_kinds(tmp_path):
    truth = _truth(tmp_path, "query_id,gallery_id,kind\nq1,g1,crop\nq2,g2,crop+screenshot\nq3,,none\n")
    assert truth.kinds == {"q1": {"crop"}, "q2": {"crop", "screenshot"}, "q3": set()}
    rows = [("q1", 1, "g1", 0.9), ("q3", 1, "gx", 0.8), ("q2", 1, "g9", 0.7), ("q2", 2, "g2", 0.6)]
    m, _ = ev.evaluate_results(*zip(*rows), truth, (1, 10))
    crop, shot = m["per_kind"]["crop"], m["per_kind"]["screenshot"]
    assert crop["queries"] == 2 and shot["queries"] == 1
    assert crop["recall@1"] == 0.5 and crop["recall@10"] == 1.0
    assert shot["recall@1"] == 0.0 and shot["recall@10"] == 1.0
    # crop pools q1, q2 and the distractor q3: the overall curve, micro-AP 0.75
    assert crop["micro_ap"] == pytest.approx(0.75)
    # screenshot pools q2 and q3: ranked gx (wrong), g9 (wrong), g2 (right): P = 1/3 at recall 1
    assert shot["micro_ap"] == pytest.approx(1 / 3)
    # without a kind column there is no per-kind entry
    plain = _truth(tmp_path, "query_id,gallery_id\nq1,g1\n")
    assert "per_kind" not in ev.evaluate_results(["q1"], [1], ["g1"], [0.9], plain)[0]


def test_evaluate_stage_writes_per_kind(tmp_path):
    """`retrieval evaluate` on a real search output: per_kind in metrics.json and in the summary."""
    import json

    from retrieval import config
    from retrieval.evaluate import STAGE
    from retrieval.index.build import build_index
    from retrieval.search.job import search

    coarse, fine = synthetic.gallery(300)
    synthetic.write_feature_output(str(tmp_path / "gallery"), coarse, fine, num_files=1)
    build_index([str(tmp_path / "gallery")], str(tmp_path / "index"),
                config.load(sets=["index.index_key=IVF8,PQ16x4", "index.quality_queries=50"]))
    qc, qf, src = synthetic.queries(300, 6, 2)
    synthetic.write_feature_output(str(tmp_path / "queries"), qc, qf, num_files=1, role="query", id_prefix="q")
    results = str(tmp_path / "search")
    search(str(tmp_path / "queries"), str(tmp_path / "index"), results, config.load(sets=["search.k=3"]))
    qids = sorted(set(read_features(str(tmp_path / "queries"), ["image_id"]).column("image_id").to_pylist()))
    truth_rows = [(q, synthetic.image_id(int(g)) if g >= 0 else "", ("crop" if i % 2 else "blur") if g >= 0 else "none")
                  for i, (q, g) in enumerate(zip(qids, src))]
    p = tmp_path / "truth.csv"
    p.write_text("query_id,gallery_id,kind\n" + "".join(f"{q},{g},{k}\n" for q, g, k in truth_rows))
    cfg = config.load()
    m = ev.evaluate(results, str(p), str(tmp_path / "eval"), cfg)
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["per_kind"] == m["per_kind"] and set(m["per_kind"]) == {k for _, _, k in truth_rows if k != "none"}
    assert STAGE.summary(m, {}, None)["per_kind"] == m["per_kind"]
