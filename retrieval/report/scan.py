"""One streaming pass over the search results (pyarrow record batches; memory bounded by the
batch size, the top-N and the ground truth, never by the number of result rows).

Per batch: the score histogram, matches and queries per threshold band, the flagged rows
(``score >= threshold``) appended to ``flagged.parquet`` and ``flagged.csv``, the exact number of
distinct flagged queries (64-bit hashes of their ids), and the top-N flagged queries by best
score. The top-N is exact even when a query's rows are split across batches or files: a member's
best score only grows, and a query evicted with score ``s`` had ``s`` below the kept minimum, which
never decreases, so a later part of it can only re-enter with a higher (and then true) best.
Ties are broken by ``query_id``, so the selection is deterministic.
"""
from __future__ import annotations

import heapq
import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from retrieval import fsio
from retrieval.metrics import Truth
from retrieval.progress import Progress
from retrieval.schema import RESULT_SCHEMA, conform_results

log = logging.getLogger(__name__)

TRUTH_FIELD = pa.field("true_match", pa.bool_())
# spreadsheet formula prefixes (OWASP "CSV injection"): such cells get a leading ' in the CSV only
_FORMULA_START = r"^[=+\-@\t\r]"


@dataclass(frozen=True)
class ScanSettings:
    threshold: float = 0.75
    bands: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    top_queries: int = 100
    matches_per_query: int = 5
    histogram_bins: int = 40
    histogram_min: float = 0.0
    batch_rows: int = 65536
    progress_seconds: float = 10.0
    score_column: str = "score"      # "norm_score" when the search normalised its scores
    threshold_source: str = "configured"   # configured | evaluation | target_fmr | default (report.threshold)
    threshold_note: str = ""         # the threshold's meaning, one sentence (shown on the page)


@dataclass
class Match:
    rank: int
    gallery_id: str
    gallery_uri: str
    score: float
    coarse_score: float | None
    true_match: bool | None = None
    cosine: float | None = None      # the raw 512-d cosine when ``score`` is the normalised score
    distance: int | None = None      # a hash match's distance (signal "pdq": Hamming bits)
    query_region: str | None = None  # the query region the match comes from (None: the whole query)
    inliers: int | None = None       # search.geometric's inlier count (None: the row was not verified)


@dataclass
class FlaggedQuery:
    query_id: str
    query_uri: str
    best: float
    matches: list[Match] = field(default_factory=list)


@dataclass
class ScanResult:
    settings: ScanSettings
    rows: int = 0
    queries: int = 0                     # rows with rank 1: queries that have results
    nonfinite_scores: int = 0
    score_min: float | None = None
    score_max: float | None = None
    hist_edges: list[float] = field(default_factory=list)
    hist_counts: list[int] = field(default_factory=list)
    band_labels: list[str] = field(default_factory=list)
    band_matches: list[int] = field(default_factory=list)
    band_queries: list[int] = field(default_factory=list)
    flagged_rows: int = 0
    flagged_queries: int = 0
    top: list[FlaggedQuery] = field(default_factory=list)
    truth: dict[str, Any] | None = None

    @property
    def more_flagged_queries(self) -> int:
        return max(0, self.flagged_queries - len(self.top))


def band_labels(edges: Sequence[float]) -> list[str]:
    if not edges:
        return ["all"]
    labels = [f"< {edges[0]:g}"]
    labels += [f"{a:g} - {b:g}" for a, b in zip(edges[:-1], edges[1:])]
    labels.append(f">= {edges[-1]:g}")
    return labels


def _batches(files: Sequence[str], batch_rows: int) -> Iterator[tuple[str, pa.RecordBatch]]:
    for url in files:
        fs, path = fsio.url_to_fs(url)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            columns = [c for c in RESULT_SCHEMA.names if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                try:
                    table = conform_results(pa.Table.from_batches([batch]))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as exc:
                    raise ValueError(f"result file {url}: columns do not fit the results schema: {exc}") from None
                for b in table.to_batches():
                    yield url, b


def _csv_safe(table: pa.Table) -> pa.Table:
    """Neutralise spreadsheet formulas in string cells (CSV only; the Parquet keeps exact values)."""
    cols = []
    for name, col in zip(table.column_names, table.columns):
        if pa.types.is_string(col.type):
            risky = pc.match_substring_regex(col, _FORMULA_START)
            col = pc.if_else(pc.fill_null(risky, False), pc.binary_join_element_wise("'", col, ""), col)
        cols.append(col)
    return pa.table(cols, names=table.column_names)


class _TopQueries:
    """The N flagged queries with the highest best score (ties: smaller query_id first)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.members: dict[str, float] = {}
        self.floor = -np.inf   # the smallest kept best score once full

    def offer(self, ids: list[str], best: np.ndarray) -> None:
        if self.n <= 0:
            return
        keep = best >= self.floor
        for q, s in zip((i for i, k in zip(ids, keep) if k), best[keep].tolist()):
            old = self.members.get(q)
            if old is None or s > old:
                self.members[q] = s
        if len(self.members) > self.n:
            kept = heapq.nsmallest(self.n, self.members.items(), key=lambda kv: (-kv[1], kv[0]))
            self.members = dict(kept)
        if len(self.members) >= self.n:
            self.floor = min(self.members.values())

    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.members.items(), key=lambda kv: (-kv[1], kv[0]))


def scan(files: Sequence[str], output_url: str, settings: ScanSettings, truth: Truth | None = None,
         total_rows: int | None = None) -> ScanResult:
    """Stream ``files``; write ``flagged.parquet`` and ``flagged.csv`` under ``output_url``; return
    the aggregates and the top flagged queries (with their top matches)."""
    edges = np.linspace(settings.histogram_min, 1.0, settings.histogram_bins + 1)
    # scores are float32: compare in float32, so a score stored as 0.9 is in the ">= 0.9" band
    bands = np.asarray(settings.bands, dtype=np.float32)
    threshold = np.float32(settings.threshold)
    res = ScanResult(settings=settings, hist_edges=[round(float(e), 6) for e in edges],
                     band_labels=band_labels(settings.bands))
    hist = np.zeros(settings.histogram_bins, dtype=np.int64)
    band_m = np.zeros(len(bands) + 1, dtype=np.int64)
    band_q = np.zeros(len(bands) + 1, dtype=np.int64)
    hashes: list[np.ndarray] = []
    top = _TopQueries(settings.top_queries)
    out_schema = RESULT_SCHEMA.append(TRUTH_FIELD) if truth is not None else RESULT_SCHEMA
    tally = _TruthTally(truth) if truth is not None else None
    progress = Progress("report scan", total=total_rows, every=settings.progress_seconds, unit="rows")

    flagged_url = fsio.join(output_url, "flagged.parquet")
    csv_url = fsio.join(output_url, "flagged.csv")
    with ExitStack() as stack:
        pq_writer = pq.ParquetWriter(stack.enter_context(fsio.atomic_open(flagged_url, "wb")),
                                     out_schema, compression="zstd")
        stack.callback(pq_writer.close)
        csv_writer = pacsv.CSVWriter(stack.enter_context(fsio.atomic_open(csv_url, "wb")), out_schema)
        stack.callback(csv_writer.close)
        for _, batch in _batches(files, settings.batch_rows):
            n = batch.num_rows
            res.rows += n
            scores = batch.column(settings.score_column).to_numpy(zero_copy_only=False).astype(np.float32)
            finite = np.isfinite(scores)
            res.nonfinite_scores += int(n - finite.sum())
            s = scores[finite]
            if s.size:
                res.score_min = float(s.min()) if res.score_min is None else min(res.score_min, float(s.min()))
                res.score_max = float(s.max()) if res.score_max is None else max(res.score_max, float(s.max()))
                hist += np.histogram(np.clip(s.astype(np.float64), edges[0], edges[-1]), bins=edges)[0]
                band_m += np.bincount(np.searchsorted(bands, s, side="right"), minlength=len(bands) + 1)
            ranks = batch.column(1).to_numpy(zero_copy_only=False)
            first = (ranks == 1) & finite
            res.queries += int((ranks == 1).sum())
            if first.any():
                band_q += np.bincount(np.searchsorted(bands, scores[first], side="right"),
                                      minlength=len(bands) + 1)
            mask = finite & (scores >= threshold)
            if mask.any():
                flagged = pa.Table.from_batches([batch]).filter(pa.array(mask))
                res.flagged_rows += flagged.num_rows
                qids = flagged.column("query_id")
                hashes.append(np.unique(pd.util.hash_array(
                    np.asarray(qids.to_pylist(), dtype=object), categorize=False)))
                grouped = flagged.group_by("query_id").aggregate([(settings.score_column, "max")])
                top.offer(grouped.column("query_id").to_pylist(),
                          grouped.column(f"{settings.score_column}_max").to_numpy().astype(np.float64))
                if tally is not None:
                    flagged = tally.label(flagged)
                pq_writer.write_table(flagged)
                csv_writer.write_table(_csv_safe(flagged))
            progress.update(n)
    progress.finish()

    res.hist_counts = hist.tolist()
    res.band_matches = band_m.tolist()
    res.band_queries = band_q.tolist()
    res.flagged_queries = int(np.unique(np.concatenate(hashes)).size) if hashes else 0
    ranked = top.ranked()
    res.top = _top_matches(flagged_url, ranked, settings.matches_per_query, settings.batch_rows, settings.score_column)
    if tally is not None:
        res.truth = tally.summary()
    return res


class _TruthTally:
    """The flagged rows against the ground truth: true pairs flagged, false rows, false alarms."""

    def __init__(self, truth: Truth) -> None:
        self.truth = truth
        self.tp_pairs: set[tuple[str, str]] = set()
        self.fp_rows = 0
        self.false_alarm_queries: set[str] = set()

    def label(self, flagged: pa.Table) -> pa.Table:
        """``flagged`` with its truth column (True / False / null for a query not in the truth)."""
        labels = []
        for q, g in zip(flagged.column("query_id").to_pylist(), flagged.column("gallery_id").to_pylist()):
            lab = self.truth.label(q, g)
            labels.append(lab)
            if lab:
                self.tp_pairs.add((q, g))
            elif lab is False:
                self.fp_rows += 1
                if not self.truth.matches[q]:
                    self.false_alarm_queries.add(q)
        return flagged.append_column(TRUTH_FIELD, pa.array(labels, pa.bool_()))

    def summary(self) -> dict[str, Any]:
        truth, tp = self.truth, len(self.tp_pairs)
        labelled_flagged = tp + self.fp_rows
        return {
            "queries": len(truth.matches),
            "positives": truth.n_pairs,
            "true_pairs_flagged": tp,
            "false_flagged_rows": self.fp_rows,
            "flagged_queries_without_true_match": len(self.false_alarm_queries),
            "recall": round(tp / truth.n_pairs, 6) if truth.n_pairs else None,
            "precision": round(tp / labelled_flagged, 6) if labelled_flagged else None,
        }


def _top_matches(flagged_url: str, ranked: list[tuple[str, float]], per_query: int,
                 batch_rows: int, column: str = "score") -> list[FlaggedQuery]:
    """The shown queries' best flagged matches, read back from ``flagged.parquet`` (only the
    rows of the selected queries are kept)."""
    if not ranked:
        return []
    wanted = pa.array([q for q, _ in ranked], pa.string())
    rows: dict[str, list[dict[str, Any]]] = {q: [] for q, _ in ranked}
    uris: dict[str, str] = {}
    fs, path = fsio.url_to_fs(flagged_url)
    with fs.open(path, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows):
            t = pa.Table.from_batches([batch])
            t = t.filter(pc.is_in(t.column("query_id"), value_set=wanted))
            for r in t.to_pylist():
                lst = rows[r["query_id"]]
                lst.append(r)
                uris.setdefault(r["query_id"], r["query_uri"] or "")
                if len(lst) > 4 * per_query:   # keep memory bounded: trim to the best
                    lst.sort(key=lambda x: (-x[column], x["rank"], x["gallery_id"]))
                    del lst[per_query:]
    out = []
    for q, best in ranked:
        lst = sorted(rows[q], key=lambda x: (-x[column], x["rank"], x["gallery_id"]))[:per_query]
        out.append(FlaggedQuery(query_id=q, query_uri=uris.get(q, ""), best=best, matches=[
            Match(rank=int(r["rank"]), gallery_id=r["gallery_id"] or "", gallery_uri=r["gallery_uri"] or "",
                  score=float(r[column]), coarse_score=None if r["coarse_score"] is None or r.get("distance") is not None
                  else float(r["coarse_score"]), true_match=r.get("true_match"),
                  cosine=float(r["score"]) if column != "score" else None, distance=r.get("distance"),
                  query_region=r.get("query_region"), inliers=r.get("inliers"))
            for r in lst]))
    return out
