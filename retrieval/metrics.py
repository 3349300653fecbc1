"""The one place the project reads ground truth and computes micro-AP and precision/recall.

Used by ``retrieval evaluate`` (:mod:`retrieval.evaluate`), ``retrieval report``
(:mod:`retrieval.report.scan`) and the training evaluation (:mod:`retrieval.train.validation`), so
the same truth file and the same predictions give the same figures everywhere.

Ground truth: a CSV whose header names the columns ``query_id`` and ``gallery_id`` (in any order;
other named columns are ignored, except an optional ``kind`` column: the edit kinds of the query,
joined by ``+``, e.g. ``crop+screenshot``; ``none`` or empty for none), then one row per true pair. A query may have several rows (several
true matches); a row with an empty ``gallery_id`` marks a query with no true match (a distractor).
Blank lines (and lines of empty cells only) are skipped; every other bad row -- an empty
``query_id``, more cells than the header names -- is a ``ValueError`` naming the file and line.

micro-AP (2021 Image Similarity Challenge): every (query, gallery, score) prediction is pooled and
ranked by score, descending; among equal scores the wrong predictions come first (the pessimistic
order, so ties never flatter a model). Precision and recall are taken after each prediction, with
recall = true pairs found so far / all true pairs (found or not), and
``micro_ap = sum_i (recall_i - recall_{i-1}) * precision_i``. With no prediction or no true pair
there is no recall to gain and ``micro_ap`` is 0.0.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from retrieval import fsio

__all__ = ["Truth", "read_truth", "precision_recall", "micro_ap", "operating_points", "kind_metrics"]

QUERY, GALLERY, KIND = "query_id", "gallery_id", "kind"


@dataclass
class Truth:
    """``matches``: query_id -> set of true gallery_ids (an empty set: a distractor query);
    ``kinds``: query_id -> its edit kinds (only when the truth file has a ``kind`` column)."""
    matches: dict[str, set[str]] = field(default_factory=dict)
    kinds: dict[str, set[str]] = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        """The number of true (query, gallery) pairs: the positives micro-AP's recall is over."""
        return sum(len(v) for v in self.matches.values())

    @property
    def matching_queries(self) -> list[str]:
        return [q for q, g in self.matches.items() if g]

    @property
    def distractor_queries(self) -> list[str]:
        return [q for q, g in self.matches.items() if not g]

    def label(self, query_id: str, gallery_id: str) -> bool | None:
        """Whether (query, gallery) is a true pair; ``None`` for a query not in the truth."""
        true = self.matches.get(query_id)
        return None if true is None else gallery_id in true


def read_truth(url: str) -> Truth:
    """Parse the ground-truth CSV at ``url`` (any fsspec URL); bad input is a ``ValueError`` naming
    the file and the line, a missing file a ``FileNotFoundError`` naming the file."""
    try:
        text = fsio.read_text(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"ground truth {url} not found") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"ground truth {url}: not UTF-8 text ({exc})") from None
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")))
    try:
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in (QUERY, GALLERY) if c not in header]
        twice = [c for c in (QUERY, GALLERY) if header.count(c) > 1]
        if missing or twice:
            why = f"missing column(s) {missing}" if missing else f"named more than once: {twice}"
            raise ValueError(f"ground truth {url} line 1: the header must name the columns {QUERY} and "
                             f"{GALLERY} once each ({why}), got {header!r}")
        qi, gi = header.index(QUERY), header.index(GALLERY)
        ki = header.index(KIND) if KIND in header else None
        truth = Truth()
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if len(row) > len(header) and any(c.strip() for c in row[len(header):]):
                raise ValueError(f"ground truth {url} line {line}: expected {len(header)} columns, "
                                 f"got {len(row)}")
            qid = row[qi].strip() if qi < len(row) else ""
            gid = row[gi].strip() if gi < len(row) else ""
            if not qid:
                raise ValueError(f"ground truth {url} line {line}: empty {QUERY}")
            true = truth.matches.setdefault(qid, set())
            if gid:
                true.add(gid)
            if ki is not None:
                kinds = truth.kinds.setdefault(qid, set())
                kinds.update(k for k in (row[ki] if ki < len(row) else "").strip().split("+")
                             if k.strip() and k.strip() != "none")
    except csv.Error as exc:
        raise ValueError(f"ground truth {url} line {reader.line_num}: not a readable CSV: {exc}") from None
    return truth


def precision_recall(scores: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray,
                     n_positives: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank the predictions (``scores``, ``correct``: one entry per prediction) by score descending,
    wrong ones first among equal scores; returns ``(precisions, recalls, scores)`` after each
    prediction, in that order (recall over ``n_positives`` true pairs, 0 when there are none)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    if scores.shape != correct.shape:
        raise ValueError(f"precision_recall: {scores.size} scores but {correct.size} labels")
    order = np.lexsort((correct, -scores))   # score desc; among ties False (wrong) first
    tp = np.cumsum(correct[order])
    precisions = tp / np.arange(1, len(order) + 1)
    recalls = tp / max(n_positives, 1)
    return precisions, recalls, scores[order]


def micro_ap(precisions: np.ndarray, recalls: np.ndarray) -> float:
    """``sum_i (recall_i - recall_{i-1}) * precision_i`` over :func:`precision_recall`'s arrays;
    0.0 when there is no prediction (or no true pair: the recalls never rise)."""
    precisions, recalls = np.asarray(precisions, np.float64), np.asarray(recalls, np.float64)
    if len(recalls) == 0:
        return 0.0
    return float((np.diff(recalls, prepend=0.0) * precisions).sum())


def operating_points(precisions: np.ndarray, recalls: np.ndarray, thresholds: np.ndarray,
                     at_recall: Sequence[float], at_precision: Sequence[float]) -> tuple[dict, dict]:
    """``({str(r): {"precision", "threshold"} or None}, {str(p): {"recall", "threshold"}})``: the best
    precision at any cut reaching recall >= r (``None``: never reached), and the best recall at any
    cut with precision >= p (recall 0.0 and threshold ``None`` when no cut has that precision);
    the threshold is the score of that cut."""
    p_at_r: dict[str, dict | None] = {}
    r_at_p: dict[str, dict] = {}
    for r in at_recall:
        i = _best_cut(recalls, r, precisions)
        p_at_r[str(r)] = None if i is None else {"precision": round(float(precisions[i]), 6),
                                                 "threshold": round(float(thresholds[i]), 6)}
    for p in at_precision:
        i = _best_cut(precisions, p, recalls)
        r_at_p[str(p)] = {"recall": 0.0, "threshold": None} if i is None else {
            "recall": round(float(recalls[i]), 6), "threshold": round(float(thresholds[i]), 6)}
    return p_at_r, r_at_p


def _best_cut(reached: np.ndarray, at_least: float, best_of: np.ndarray) -> int | None:
    """The cut with the highest ``best_of`` among those where ``reached >= at_least`` (the first
    such cut on a tie; ``None`` when no cut reaches it)."""
    ok = np.nonzero(reached >= at_least - 1e-12)[0]
    return int(ok[np.argmax(best_of[ok])]) if len(ok) else None


def kind_metrics(truth: Truth, best_rank: dict[str, int], pairs: dict[tuple[str, str], float],
                 recall_at: Sequence[int] = (1, 10)) -> dict[str, dict]:
    """Per edit kind (``truth.kinds``; empty without a ``kind`` column): ``queries`` (the matching
    queries with that kind), ``recall@k`` over them (``best_rank``: query -> rank of its first true
    match) and ``micro_ap`` over the predictions (``pairs``: (query, gallery) -> score) of those
    queries plus every distractor query's (the unrelated queries a threshold must still beat),
    recall over those queries' true pairs. A query with several kinds counts in each."""
    by_kind: dict[str, list[str]] = {}
    for q in truth.matching_queries:
        for k in truth.kinds.get(q, ()):
            by_kind.setdefault(k, []).append(q)
    distractors = set(truth.distractor_queries)
    out: dict[str, dict] = {}
    for kind in sorted(by_kind):
        qs = set(by_kind[kind])
        m: dict = {"queries": len(qs)}
        for k in recall_at:
            m[f"recall@{k}"] = round(sum(1 for q in qs if best_rank.get(q, 1 << 30) <= k) / len(qs), 6)
        keys = [key for key in pairs if key[0] in qs or key[0] in distractors]
        p, r, _ = precision_recall([pairs[key] for key in keys], [key[1] in truth.matches[key[0]] for key in keys],
                                   sum(len(truth.matches[q]) for q in qs))
        m["micro_ap"] = round(micro_ap(p, r), 6)
        out[kind] = m
    return out


# the metrics file of `retrieval evaluate`, and the thresholds it measured (read by the report)
METRICS = "metrics.json"


def threshold_from_evaluation(url: str, precision: float, column: str) -> float:
    """The threshold ``retrieval evaluate`` wrote at ``precision`` (``url``: its metrics.json or
    the folder holding it); refused when it was measured on another score column."""
    if not url.endswith(".json"):
        url = fsio.join(url, METRICS)
    try:
        m = fsio.read_json(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"report.threshold.from_evaluation: {url} not found") from None
    th = m.get("thresholds") if isinstance(m, dict) else None
    if not th or m.get("stage") != "evaluate":
        raise ValueError(f"report.threshold.from_evaluation: {url} is not the metrics.json of "
                         "`retrieval evaluate` (no thresholds)")
    if th.get("score") != column:
        raise ValueError(f"report.threshold.from_evaluation: {url} measured thresholds on "
                         f"{th.get('score')!r}, but these results are scored by {column!r} "
                         "(normalised and raw scores are on different scales)")
    value = th.get("precision", {}).get(str(precision))
    if value is None:
        raise ValueError(f"report.threshold.from_evaluation: {url} never reached precision {precision} "
                         "(no threshold at that precision)")
    return float(value)
