"""``retrieval report``: search results + stage manifests (+ ground truth) -> audit report.

Output directory (any fsspec URL), each file written atomically:

- ``report.html``: self-contained page (summary, stage errors, threshold bands, versions,
  timings, score histogram, the top flagged queries beside their matches with thumbnails);
- ``flagged.parquet`` / ``flagged.csv``: every result row with ``score >= report.threshold``
  (the results schema, plus ``true_match`` when ground truth is given);
- ``thumbs/*.jpg`` only with ``report.thumbnails=files`` (default ``embed``: data: URIs);
- ``summary.json``: counts, thresholds, versions, a few top flagged pairs; small enough for an
  Airflow XCom or an alert message;
- ``_manifest.json``, written LAST (its presence marks a complete report, :mod:`retrieval.outputs`):
  the sha256 of the files above, counts, timings.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from retrieval import fsio, outputs
from retrieval.report import runinfo
from retrieval.report.html import render
from retrieval.report.scan import ScanSettings, scan
from retrieval.config import Config
from retrieval.metrics import read_truth

log = logging.getLogger(__name__)
SUMMARY = "summary.json"
HTML = "report.html"
SUMMARY_TOP = 10


def settings_from(cfg: Config, search_manifest: dict | None = None) -> ScanSettings:
    """Scan settings; the score is ``norm_score`` when the search normalised (its manifest's
    ``params.normalize``), and ``report.threshold: {from_evaluation: URL, precision: p}`` is the
    threshold ``retrieval evaluate`` measured at precision p on that same score."""
    from retrieval.evaluate import threshold_from_evaluation
    from retrieval.search.normalize import score_column

    r = cfg["report"]
    column = score_column(search_manifest or {})
    threshold = r["threshold"]
    if isinstance(threshold, dict):
        threshold = threshold_from_evaluation(threshold["from_evaluation"], float(threshold.get("precision", 0.9)),
                                              column)
    bands, hist_min = r["bands"], float(r["histogram_min"])
    if column == "norm_score":          # normalised scores sit lower: their own bands, histogram from -0.5
        bands, hist_min = r["norm_bands"], min(hist_min, -0.5)
    return ScanSettings(threshold=float(threshold), bands=tuple(float(b) for b in bands),
                        top_queries=int(r["top_queries"]), matches_per_query=int(r["matches_per_query"]),
                        hist_bins=int(r["histogram_bins"]), hist_min=hist_min,
                        batch_rows=int(r["batch_rows"]), progress_seconds=float(r["progress_seconds"]),
                        score_column=column)


def _thumbnails(result, r, cfg: Config, st, output_url: str):
    """The thumbnails of the shown queries and their matches (``report.thumbnails``: embedded,
    files or none): ``(thumbs, src_of(uri), reason_of(uri))``."""
    uris = [u for fq in result.top for u in [fq.query_uri, *(m.gallery_uri for m in fq.matches)]]
    mode = r["thumbnails"]
    thumbs: dict = {}
    rel: dict[str, str] = {}
    if mode != "none" and uris:
        # imported here: the image decoder pulls in torch, which a report without thumbnails skips
        from retrieval.report.thumbs import make_thumbnails, write_thumbnails
        from retrieval.extract.preprocess import DecodePolicy

        thumbs = make_thumbnails(uris, int(r["thumbnail_size"]),
                                 DecodePolicy.from_config(cfg["preprocess"].to_dict()),
                                 threads=int(r["thumbnail_threads"]), progress_seconds=st.progress_seconds)
        if mode == "files":
            rel = write_thumbnails(thumbs, output_url)

    def src_of(uri: str) -> str | None:
        t = thumbs.get(uri)
        if t is None or t.jpeg is None:
            return None
        return rel.get(uri) if mode == "files" else t.data_uri()

    def reason_of(uri: str) -> str:
        if mode == "none":
            return "thumbnails off (report.thumbnails=none)"
        t = thumbs.get(uri)
        return (t.error if t is not None else None) or "unavailable"

    return thumbs, src_of, reason_of


def _summary(results_url: str, output_url: str, truth_url: str | None, generated: str, cfg: Config, st,
             info, result, thumbs: dict, files: dict) -> dict[str, Any]:
    """``summary.json`` (its timings are added by the caller)."""
    thumb_errors = sum(1 for t in thumbs.values() if t.jpeg is None)
    return {
        "stage": "report",
        "results": results_url,
        "output": output_url,
        "truth": truth_url,
        "generated": generated,
        "thresholds": {"flag": st.threshold, "bands": list(st.bands), "score": st.score_column,
                       "configured": cfg["report.threshold"]},
        "counts": {
            "queries": info.stage("search").counts.get("queries", result.queries),
            "queries_with_results": result.queries,
            "rows": result.rows,
            "flagged_matches": result.flagged_rows,
            "flagged_queries": result.flagged_queries,
            "flagged_queries_shown": len(result.top),
            "flagged_queries_not_shown": result.more_flagged_queries,
            "nonfinite_scores": result.nonfinite_scores,
            "thumbnails": len(thumbs),
            "thumbnail_errors": thumb_errors,
        },
        "bands": [{"band": label, "matches": m, "queries": q}
                  for label, m, q in zip(result.band_labels, result.band_matches, result.band_queries)],
        "errors": {s.name: (s.counts.get("query_errors") if s.name == "search" else s.counts.get("errors"))
                   for s in info.stages},
        "stages": {s.name: s.to_summary() for s in info.stages},
        "versions": {"model_version": info.model_version,
                     "index": info.stage("index").details,
                     "problems": info.version_problems()},
        "top_flagged": [{"query_id": fq.query_id, "gallery_id": fq.matches[0].gallery_id if fq.matches else None,
                         "score": round(fq.best, 6)} for fq in result.top[:SUMMARY_TOP]],
        "ground_truth": result.truth,
        "files": files,
    }


@outputs.leased
def build_report(results_url: str, output_url: str, cfg: Config, truth_url: str | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write the report for the search output ``results_url`` into ``output_url``; return the
    summary (also written as ``summary.json``). ``overwrite``: replace whatever ``output_url`` holds."""
    t0 = time.monotonic()
    r = cfg["report"]
    info = runinfo.gather(results_url, errors_shown=int(r["errors_shown"]), verify=bool(r["verify"]))
    st = settings_from(cfg, info.manifest)
    total_rows = sum(runinfo.check_result_schema(f) for f in info.result_files)
    expected = (info.manifest.get("counts") or {}).get("rows")
    if isinstance(expected, int) and expected != total_rows:
        raise ValueError(f"{results_url}: the result files hold {total_rows} rows but the manifest "
                         f"counts {expected} (files missing, extra or altered)")
    truth = read_truth(truth_url) if truth_url else None
    fsio.ensure_writable(output_url)
    outputs.claim(output_url, outputs.identity("report", cfg, [results_url, truth_url]), cfg, overwrite)
    summary_url = fsio.join(output_url, SUMMARY)
    outputs.begin(output_url)      # the report is incomplete until its marker is rewritten
    if fsio.exists(summary_url):   # (and summary.json, which the DAG publishes)
        fs, p = fsio.url_to_fs(summary_url)
        fs.rm(p)
    t_read = time.monotonic()
    result = scan(info.result_files, output_url, st, truth, total_rows=total_rows)
    t_scan = time.monotonic()

    thumbs, src_of, reason_of = _thumbnails(result, r, cfg, st, output_url)
    t_thumbs = time.monotonic()
    generated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    files = {"html": HTML, "flagged_parquet": "flagged.parquet", "flagged_csv": "flagged.csv", "summary": SUMMARY}
    page = render(info, result, src_of, reason_of, generated, files)
    fsio.write_bytes(fsio.join(output_url, HTML), page.encode("utf-8"))
    t_html = time.monotonic()

    summary = _summary(results_url, output_url, truth_url, generated, cfg, st, info, result, thumbs, files)
    summary["timings"] = {"read_manifests_s": round(t_read - t0, 3), "scan_s": round(t_scan - t_read, 3),
                          "thumbnails_s": round(t_thumbs - t_scan, 3), "html_s": round(t_html - t_thumbs, 3),
                          "total_s": round(time.monotonic() - t0, 3),
                          "rows_per_s": round(result.rows / (t_scan - t_read), 1) if t_scan > t_read else None}
    summary = runinfo.compact(summary)
    fsio.write_json(summary_url, summary)
    outputs.commit(output_url, "report", {
        "results": results_url, "output": output_url, "counts": summary.get("counts"),
        "files": outputs.file_entries(output_url, [HTML, "flagged.parquet", "flagged.csv", SUMMARY]),
        "timings": summary["timings"]}, engine=None, cfg=cfg)
    log.info("report done: %d rows, %d flagged matches in %d queries, %d shown -> %s (%.1fs)",
             result.rows, result.flagged_rows, result.flagged_queries, len(result.top),
             fsio.join(output_url, HTML), summary["timings"]["total_s"])
    return summary
