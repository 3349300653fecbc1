"""``retrieval evaluate``: search results + ground truth -> recall@k, micro-AP, precision/recall
operating points, a precision-recall plot; optionally the same queries by exact 512-d search.

Definitions (docs/search.md; the truth reader, micro-AP and the operating points live in
:mod:`retrieval.metrics`, shared with ``retrieval report`` and the training evaluation):

- ground truth: CSV ``query_id,gallery_id``, one row per true pair; a query with an empty
  ``gallery_id`` has no true match (a distractor). Queries absent from the CSV are left out.
- ``recall@k``: over the queries with at least one true match, the fraction with a true match
  at rank <= k.
- ``micro_ap`` (2021 Image Similarity Challenge): every (query, gallery, score) prediction of every
  query is pooled and ranked by score (ties: wrong predictions first, the pessimistic order);
  precision and recall are taken after each prediction (recall = true pairs found / all true
  pairs in the truth, found or not) and ``micro_ap = sum_i (recall_i - recall_{i-1}) *
  precision_i``. Predictions for distractor queries are false positives, so a low score threshold
  on them matters.
- ``precision_at_recall[r]``: the best precision at any cut reaching recall >= r (with the score
  of that cut); ``recall_at_precision[p]``: the best recall at precision >= p.
- scores: the search's ``norm_score`` when it normalised its scores (``search.normalize``), else the
  512-d cosine ``score``; ``thresholds`` records which, and the score at which precision first
  drops below 90% and 95% (``report.threshold: {from_evaluation: URL}`` reads them).
- ``per_kind`` (only when the truth CSV has a ``kind`` column: the query's edit kinds joined by
  ``+``): per kind, the recall@k over its matching queries and the micro-AP of their predictions
  pooled with every distractor query's (:func:`retrieval.metrics.kind_metrics`).
- ``--exact INDEX``: the queries are scored by brute force against every gallery vector of the
  index's feature files (faiss inner product, in batches); ``exact.kept_at_k`` is the mean fraction
  of each query's exact top-k that the evaluated results also return in their top k.
"""
from __future__ import annotations

import io
import logging
import time
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from retrieval import fsio, integrity, outputs
from retrieval.metrics import (METRICS, Truth, kind_metrics, micro_ap, operating_points, precision_recall,  # noqa: F401
                               read_truth, threshold_from_evaluation)
from retrieval.stage import Stage, arg, positive

log = logging.getLogger(__name__)
PLOT = "pr_curve.png"
THRESHOLD_PRECISIONS = (0.9, 0.95)     # evaluate writes the report thresholds at these precisions


def evaluate_results(query_ids: Sequence[str], ranks: Sequence[int], gallery_ids: Sequence[str],
                     scores: Sequence[float], truth: Truth, recall_at: Sequence[int] = (1, 10),
                     precision_at_recall: Sequence[float] = (0.5, 0.75, 0.9),
                     recall_at_precision: Sequence[float] = (0.9,)) -> tuple[dict, dict]:
    """Metrics of result rows against ``truth``; also returns the PR curve arrays."""
    best_rank: dict[str, int] = {}
    pairs: dict[tuple[str, str], float] = {}
    not_in_truth: set[str] = set()
    for q, r, g, s in zip(query_ids, ranks, gallery_ids, scores):
        t = truth.matches.get(q)
        if t is None:
            not_in_truth.add(q)
            continue
        key = (q, g)
        if key not in pairs or s > pairs[key]:
            pairs[key] = float(s)
        if g in t and r < best_rank.get(q, 1 << 30):
            best_rank[q] = int(r)
    matching = truth.matching_queries
    recall = {f"recall@{k}": round(sum(1 for q in matching if best_rank.get(q, 1 << 30) <= k)
                                   / max(len(matching), 1), 6) for k in recall_at}
    keys = list(pairs)
    p_scores = np.array([pairs[k] for k in keys], dtype=np.float64)
    correct = np.array([k[1] in truth.matches[k[0]] for k in keys], dtype=bool)
    precisions, recalls, thresholds = precision_recall(p_scores, correct, truth.n_pairs)
    p_at_r, r_at_p = operating_points(precisions, recalls, thresholds, precision_at_recall,
                                      recall_at_precision)
    queries_in_results = {q for q in query_ids}
    metrics = {
        **recall,
        "micro_ap": round(micro_ap(precisions, recalls), 6),
        "precision_at_recall": p_at_r,
        "recall_at_precision": r_at_p,
        "counts": {"truth_queries": len(truth.matches), "matching_queries": len(matching),
                   "distractor_queries": len(truth.distractor_queries), "true_pairs": truth.n_pairs,
                   "predictions": len(keys), "correct_predictions": int(correct.sum()),
                   "queries_in_results": len(queries_in_results),
                   "matching_queries_without_results": sum(1 for q in matching if q not in queries_in_results),
                   "queries_not_in_truth": len(not_in_truth)},
    }
    if truth.kinds:
        metrics["per_kind"] = kind_metrics(truth, best_rank, pairs, recall_at)
    return metrics, {"precision": precisions, "recall": recalls, "threshold": thresholds}


def plot_pr(curve: dict, url: str, title: str, extra: dict | None = None) -> None:
    """Precision-recall curve as a PNG (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    ax.plot(curve["recall"], curve["precision"], lw=2, label="two-stage search")
    if extra is not None and len(extra["recall"]):
        ax.plot(extra["recall"], extra["precision"], lw=1.5, ls="--", label="exact 512-d")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    fsio.write_bytes(url, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# exact search
def exact_search(query_fine: np.ndarray, feature_files: Sequence[str], k: int,
                 batch_rows: int = 65536, query_chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top ``k`` (scores, int64 gallery ids) of every query against every fine vector
    of ``feature_files`` (read in row batches, never all at once)."""
    import faiss

    from retrieval.index import idmap
    from retrieval.schema import fine_matrix

    nq = len(query_fine)
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    for a in range(0, nq, query_chunk):
        xq = np.ascontiguousarray(query_fine[a:a + query_chunk], dtype=np.float32)
        heap = faiss.ResultHeap(len(xq), k, keep_max=True)
        for file_no, url in enumerate(feature_files):
            pf = fsio.parquet_file(url)
            cols = ["fine", "fine_scale"] if "fine_scale" in pf.schema_arrow.names else ["fine"]
            row0 = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
                xb = fine_matrix(pa.Table.from_batches([batch]))
                kk = min(k, len(xb))
                d, i = faiss.knn(xq, np.ascontiguousarray(xb), kk, metric=faiss.METRIC_INNER_PRODUCT)
                if kk < k:
                    d = np.pad(d, ((0, 0), (0, k - kk)), constant_values=-np.inf)
                    i = np.pad(i, ((0, 0), (0, k - kk)), constant_values=-1)
                ids = np.where(i >= 0, idmap.encode_ids(file_no, row0 + np.maximum(i, 0)), -1)
                heap.add_result(d.astype(np.float32), ids.astype(np.int64))
                row0 += len(xb)
        heap.finalize()
        out_s[a:a + len(xq)], out_i[a:a + len(xq)] = heap.D, heap.I
    return out_s, out_i


def compare_with_exact(results: pa.Table, query_ids: Sequence[str], exact_gallery_ids: list[list[str]],
                       k: int) -> dict:
    """How much of each query's exact top-k the results keep (in their own top k)."""
    got: dict[str, list[tuple[int, str]]] = defaultdict(list)
    d = results.select(["query_id", "rank", "gallery_id"]).to_pydict()
    for q, r, g in zip(d["query_id"], d["rank"], d["gallery_id"]):
        got[q].append((r, g))
    kept, rank1 = [], []
    for q, exact in zip(query_ids, exact_gallery_ids):
        if not exact:
            continue
        mine = [g for _, g in sorted(got.get(q, []))[:k]]
        kept.append(len(set(mine) & set(exact)) / len(exact))
        rank1.append(bool(mine) and mine[0] == exact[0])
    return {"k": k, "queries": len(kept), "kept_at_k": round(float(np.mean(kept)) if kept else 0.0, 6),
            "rank1_agreement": round(float(np.mean(rank1)) if rank1 else 0.0, 6)}


def exact_results(query_features_url: str, index_url: str, cfg, background=None) -> tuple[pa.Table, float]:
    """The exact 512-d top ``evaluate.exact_k`` of every query, as a result table (same columns
    as the search output that matter here: query_id, rank, gallery_id, score, and norm_score
    when ``background`` (:class:`~retrieval.search.normalize.Background`) is given)."""
    from retrieval.extract.features import read_features, read_manifest
    from retrieval.index import idmap, store
    from retrieval.schema import fine_matrix

    evaluate_cfg = cfg.evaluate
    manifest = store.read_index_manifest(index_url)
    integrity.verify_files([(f["url"], f.get("sha256")) for f in manifest["feature_files"]],
                           "gallery feature file", store.manifest_url(index_url),
                           record=integrity.record_path(cfg["io.verified_record"]))
    regions = bool(read_manifest(query_features_url).get("query_regions"))
    qt = read_features(query_features_url, ["image_id", "fine"] + (["fine_scale"] if _is_int8(query_features_url) else [])
                       + (["region"] if regions else []))
    t0 = time.monotonic()
    files = store.feature_file_urls(manifest)
    q_fine = fine_matrix(qt)
    s, i = exact_search(q_fine, files, evaluate_cfg.exact_k, evaluate_cfg.exact_batch_rows,
                        evaluate_cfg.exact_query_chunk)
    norm = None
    if background is not None:
        from retrieval.search.normalize import normalized

        norm = normalized(s, q_fine, background)
    region = None
    if regions:         # per image, the best (normalised) score over its rows, as the search merges
        from retrieval.search.regions import merge_chunk

        qt, s, i, _, norm, region, _ = merge_chunk(qt, s, i, np.zeros_like(s), norm, evaluate_cfg.exact_k,
                                                   margin=float(cfg["search.region_margin"]))
    seconds = time.monotonic() - t0
    rows, ranks = np.nonzero(i >= 0)
    gal = idmap.fetch_rows(files, i[rows, ranks], ["image_id"]) if len(rows) else None
    qids = qt.column("image_id").take(pa.array(rows.astype(np.int64)))
    table = pa.table({"query_id": qids, "rank": pa.array((ranks + 1).astype(np.int32)),
                      "gallery_id": gal.column("image_id") if gal is not None else pa.array([], pa.string()),
                      "score": pa.array(s[rows, ranks].astype(np.float32))})
    if norm is not None:
        table = table.append_column("norm_score", pa.array(norm[rows, ranks].astype(np.float32)))
    if region is not None:
        table = table.append_column("query_region", region)
    return table, seconds


def thresholds(metrics: dict, column: str, curve: dict) -> dict:
    """The score thresholds at :data:`THRESHOLD_PRECISIONS` (the lowest score whose cut keeps the
    precision; ``None`` where it is never reached), for ``report.threshold: {from_evaluation}``."""
    _, r_at_p = operating_points(curve["precision"], curve["recall"], curve["threshold"], (),
                                 THRESHOLD_PRECISIONS)
    return {"score": column,
            "precision": {str(p): (r_at_p[str(p)] or {}).get("threshold") for p in THRESHOLD_PRECISIONS},
            "recall": {str(p): (r_at_p[str(p)] or {}).get("recall") for p in THRESHOLD_PRECISIONS}}


def _is_int8(features_url: str) -> bool:
    from retrieval.extract.features import read_manifest

    return read_manifest(features_url).get("storage") == "int8"


# ---------------------------------------------------------------------------------------------
@outputs.leased
def evaluate(results_url: str, truth_url: str, output_url: str | None, cfg, exact_index: str | None = None,
             overwrite: bool = False) -> dict:
    """Write ``metrics.json`` and ``pr_curve.png`` under ``output_url`` (default
    ``<results>.eval``, beside the results, not in them); returns the metrics."""
    from retrieval.search.results import read_results, read_results_manifest
    from retrieval.search.normalize import score_column

    t0 = time.monotonic()
    evaluate_cfg = cfg.evaluate
    fsio.configure(cfg["io.storage_options"])
    output_url = output_url or results_url.rstrip("/") + ".eval"
    fsio.ensure_writable(output_url)
    outputs.claim(output_url, outputs.identity("evaluate", cfg, [results_url, truth_url, exact_index]), cfg,
                  overwrite)
    outputs.begin(output_url)
    results = read_results(results_url)
    truth = read_truth(truth_url)
    search_manifest = read_results_manifest(results_url)     # a search's, or a pdq match's
    column = score_column(search_manifest)
    d = results.select(["query_id", "rank", "gallery_id", column]).to_pydict()
    metrics, curve = evaluate_results(d["query_id"], d["rank"], d["gallery_id"], d[column], truth,
                                      evaluate_cfg.recall_at, evaluate_cfg.precision_at_recall,
                                      evaluate_cfg.recall_at_precision)
    out: dict[str, Any] = {"stage": "evaluate", "results": results_url, "truth": truth_url,
                           "model_version": search_manifest.get("model_version"),
                           "search_params": search_manifest.get("params"), **metrics,
                           "thresholds": thresholds(metrics, column, curve)}
    exact_curve = None
    if exact_index:
        qf = search_manifest.get("query_features")
        if not qf:
            raise ValueError(f"{results_url}: the search manifest names no query_features for --exact")
        background = None
        if column == "norm_score":     # the exact scores normalised by the same background
            from retrieval.index import store
            from retrieval.search.normalize import load_background

            exact_manifest = store.read_index_manifest(exact_index)
            background = load_background(search_manifest["config"]["search"]["normalize"], exact_manifest,
                                         list(store.feature_file_urls(exact_manifest)))
        exact, seconds = exact_results(qf, exact_index, cfg, background)
        e = exact.to_pydict()
        e_metrics, exact_curve = evaluate_results(e["query_id"], e["rank"], e["gallery_id"], e[column],
                                                  truth, evaluate_cfg.recall_at, evaluate_cfg.precision_at_recall,
                                                  evaluate_cfg.recall_at_precision)
        per_query: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for q, r, g in zip(e["query_id"], e["rank"], e["gallery_id"]):
            per_query[q].append((r, g))
        qids = sorted(per_query)
        cmp = compare_with_exact(results, qids, [[g for _, g in sorted(per_query[q])] for q in qids],
                                 evaluate_cfg.exact_k)
        # of the matching queries the exact search ranks right, how many the two-stage search does
        exact_hits = {q for q in truth.matching_queries if per_query.get(q) and
                      sorted(per_query[q])[0][1] in truth.matches[q]}
        ts_hits = {q for q, r, g in zip(d["query_id"], d["rank"], d["gallery_id"])
                   if r == 1 and g in truth.matches.get(q, ())}
        out["exact"] = {"index": exact_index, "seconds": round(seconds, 3), **cmp,
                        "rank1_correct_exact": len(exact_hits),
                        "rank1_correct_two_stage_of_exact": len(exact_hits & ts_hits),
                        "rank1_retained": round(len(exact_hits & ts_hits) / max(len(exact_hits), 1), 6),
                        "metrics": e_metrics}
    out["timings"] = {"total_s": round(time.monotonic() - t0, 3)}
    plot_pr(curve, fsio.join(output_url, PLOT),
            f"micro-AP {metrics['micro_ap']:.3f}, recall@1 {metrics.get('recall@1', float('nan')):.3f}",
            exact_curve)
    out["plot"] = fsio.join(output_url, PLOT)
    fsio.write_json(fsio.join(output_url, METRICS), out)
    outputs.commit(output_url, "evaluate", {
        "results": results_url, "truth": truth_url, "output": output_url, "counts": out.get("counts"),
        "files": outputs.file_entries(output_url, [METRICS, PLOT]), "timings": out["timings"]}, cfg=cfg)
    return out


def _run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> dict:
    """``retrieval evaluate`` (runs on the driver: results and truth are small; ``engine`` unused)."""
    return evaluate(inputs["results"], inputs["truth"], output, cfg, inputs.get("exact"),
                    bool(inputs.get("overwrite")))


def _summary(m: dict, inputs: Mapping[str, Any], output: str | None) -> dict:
    keep = ("micro_ap", "precision_at_recall", "recall_at_precision", "thresholds", "counts", "plot", "per_kind")
    out = {k: v for k, v in m.items() if k.startswith("recall@") or k in keep}
    if "exact" in m:
        out["exact"] = {k: v for k, v in m["exact"].items() if k != "metrics"}
        out["exact"]["micro_ap"] = m["exact"]["metrics"]["micro_ap"]
    return out


STAGE = Stage(
    name="evaluate",
    help="recall@k, micro-AP and a PR curve against ground truth",
    usage="--results URL --truth CSV",
    args=(
        arg("--results", required=True, help="search output URL"),
        arg("--truth", required=True, help="CSV: query_id, gallery_id (empty: no true match)"),
        arg("--output", default=None, help="where to write metrics.json and pr_curve.png (default: <results>.eval, beside the results)"),
        arg("--exact", default=None, metavar="INDEX",
            help="also compare with exact 512-d search over this index's gallery"),
    ),
    run=_run,
    summary=_summary,
    section="evaluate",
    checks={
        "evaluate.recall_at": lambda v: None if v and all(isinstance(k, int) and not isinstance(k, bool)
                                                          and k > 0 for k in v) else "must be a list of ints > 0",
        "evaluate.precision_at_recall": lambda v: None if all(isinstance(r, (int, float)) and 0 < r <= 1
                                                              for r in v) else "must be a list in (0, 1]",
        "evaluate.recall_at_precision": lambda v: None if all(isinstance(r, (int, float)) and 0 < r <= 1
                                                              for r in v) else "must be a list in (0, 1]",
        "evaluate.exact_k": positive,
        "evaluate.exact_batch_rows": positive,
        "evaluate.exact_query_chunk": positive,
    },
    engine="local",     # reads results with pyarrow: no executors needed
)
