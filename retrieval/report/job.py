"""``retrieval report``: search results + stage manifests (+ ground truth) -> audit report.

Output directory (any fsspec URL), each file written atomically:

- ``report.html``: self-contained page (summary, stage errors, threshold bands, versions,
  timings, score histogram, the top flagged queries beside their matches with thumbnails);
- ``flagged.parquet`` / ``flagged.csv``: every result row with ``score >= report.threshold``
  (the results schema, plus ``true_match`` when ground truth is given);
- ``thumbs/*.jpg`` only with ``report.thumbnails=files`` (default ``embed``: data: URIs);
- ``full/*.jpg``: the full-size copies the thumbnails link to (``report.full_size``; not with ``none``);
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
from retrieval.report import groups as groups_mod
from retrieval.report import runinfo
from retrieval.report.html import render_page
from retrieval.report.scan import ScanSettings, scan
from retrieval.report.shown import ShownImages, shown_images
from retrieval.config import Config
from retrieval.metrics import read_truth

log = logging.getLogger(__name__)
SUMMARY = "summary.json"
HTML = "report.html"
SUMMARY_TOP = 10


DEFAULT_THRESHOLD = 0.75     # report.threshold auto without false-match rates or an evaluation
SCORE_MEANING = {"score": "the cosine of the two images' 512-d descriptors (1 = the same picture; it is not "
                          "a probability)",
                 "norm_score": "the descriptors' cosine minus beta x the query's similarity to unrelated "
                               "background images (it is not a probability)"}


def choose_threshold(report_cfg, column: str, search_manifest: dict) -> tuple[float, str, str]:
    """``(threshold, source, meaning)`` of ``report.threshold`` (``report_cfg``: the report section): an
    evaluation's measured threshold at the configured precision (``evaluation``); a number
    (``configured``); ``auto``: from ``report.target_fmr`` when the results carry false-match rates
    (``target_fmr``: the search manifest's ``calibration``, on ``norm_score``), else the fixed
    :data:`DEFAULT_THRESHOLD` (``default``). ``meaning``: one sentence for the page."""
    from retrieval.metrics import threshold_from_evaluation
    from retrieval.search.calibrate import NullTail

    threshold = report_cfg["threshold"]
    if search_manifest.get("stage") == "pdq" and threshold == "auto":     # retrieval pdq match rows
        d = int(search_manifest.get("params", {}).get("max_distance", 31))
        t = 1.0 - 2.0 * d / 256
        return t, "pdq", (f"PDQ hash matches: score is 1 - 2 x the Hamming distance of the two images' PDQ hashes "
                          f"/ 256 (1 = identical hashes, not a probability); the match kept distances <= {d} bits "
                          f"(pdq.max_distance), so every row is flagged (score >= {t:.4g}).")
    calibration = search_manifest.get("calibration") if column == "norm_score" else None
    tail = NullTail.from_manifest(calibration) if calibration else None
    if isinstance(threshold, dict):
        precision = float(threshold.get("precision", 0.9))
        t = threshold_from_evaluation(threshold["from_evaluation"], precision, column)
        return t, "evaluation", (f"Flagged at {column} >= {t:.4g}: the threshold retrieval evaluate measured "
                                 f"at {precision:.0%} precision on labelled pairs ({threshold['from_evaluation']}).")
    if threshold == "auto" and tail is not None:
        target = float(report_cfg["target_fmr"])
        t = tail.threshold(target)
        return t, "target_fmr", (
            f"Flagged at {column} >= {t:.4g}: a query with no copy in the gallery of {tail.gallery:,} images "
            f"gets a false match this high with an estimated probability of {target:g} (report.target_fmr; "
            f"one unrelated image: {float(tail.fmr(t)):.2g}), from {tail.background:,} background images "
            "(each row's fmr / fmr_query columns give its own rate).")
    if threshold == "auto":
        return DEFAULT_THRESHOLD, "default", (
            f"Flagged at {column} >= {DEFAULT_THRESHOLD:g}, a fixed default that says nothing about how often "
            f"unrelated images score this high: {column} is {SCORE_MEANING[column]}. Give the search a "
            "background (search.normalize.background) for estimated false-match rates, or set "
            "report.threshold from a labelled evaluation.")
    t = float(threshold)
    rate = (f"; at that score a query with no copy gets a false match with an estimated probability of "
            f"{float(tail.fmr_query(t)):.2g}" if tail is not None else f" ({column} is {SCORE_MEANING[column]})")
    return t, "configured", f"Flagged at {column} >= {t:g}, as configured (report.threshold){rate}."


def settings_from(cfg: Config, search_manifest: dict | None = None) -> ScanSettings:
    """Scan settings; the score is ``norm_score`` when the search normalised (its manifest's
    ``params.normalize``), else the raw cosine; the threshold is :func:`choose_threshold`'s."""
    from retrieval.search.normalize import score_column

    report_cfg = cfg["report"]
    column = score_column(search_manifest or {})
    threshold, source, note = choose_threshold(report_cfg, column, search_manifest or {})
    bands, histogram_min = report_cfg["bands"], float(report_cfg["histogram_min"])
    if column == "norm_score":          # normalised scores sit lower: their own bands, histogram from -0.5
        bands, histogram_min = report_cfg["norm_bands"], min(histogram_min, -0.5)
    return ScanSettings(threshold=float(threshold), bands=tuple(float(b) for b in bands),
                        top_queries=int(report_cfg["top_queries"]),
                        matches_per_query=int(report_cfg["matches_per_query"]),
                        histogram_bins=int(report_cfg["histogram_bins"]), histogram_min=histogram_min,
                        batch_rows=int(report_cfg["batch_rows"]),
                        progress_seconds=float(report_cfg["progress_seconds"]),
                        score_column=column, threshold_source=source, threshold_note=note)


def _summary(results_url: str, output_url: str, truth_url: str | None, generated: str, cfg: Config, settings,
             info, result, shown: ShownImages, files: dict) -> dict[str, Any]:
    """``summary.json`` (its timings are added by the caller)."""
    return {
        "stage": "report",
        "results": results_url,
        "output": output_url,
        "truth": truth_url,
        "generated": generated,
        "thresholds": {"flag": settings.threshold, "bands": list(settings.bands), "score": settings.score_column,
                       "configured": cfg["report.threshold"], "source": settings.threshold_source,
                       "target_fmr": cfg["report.target_fmr"] if settings.threshold_source == "target_fmr" else None,
                       "meaning": settings.threshold_note},
        "counts": {
            "queries": info.stage("search").counts.get("queries", result.queries),
            "queries_with_results": result.queries,
            "rows": result.rows,
            "flagged_matches": result.flagged_rows,
            "flagged_queries": result.flagged_queries,
            "flagged_queries_shown": len(result.top),
            "flagged_queries_not_shown": result.more_flagged_queries,
            "nonfinite_scores": result.nonfinite_scores,
            "thumbnails": len(shown.thumbs),
            "thumbnail_errors": shown.errors,
            "thumbnails_outside_roots": len(shown.outside),
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
    report_cfg = cfg["report"]
    info = runinfo.gather(results_url, errors_shown=int(report_cfg["errors_shown"]), verify=bool(report_cfg["verify"]))
    settings = settings_from(cfg, info.manifest)
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
    result = scan(info.result_files, output_url, settings, truth, total_rows=total_rows)
    t_scan = time.monotonic()

    groups_url = report_cfg["duplicates"]
    sheets = groups_mod.sheets(groups_url, int(report_cfg["groups_shown"]), int(report_cfg["group_members"]))
    shown = shown_images(result, report_cfg, cfg, info.input_urls(), settings.progress_seconds, output_url,
                         groups_mod.uris(sheets))
    t_thumbs = time.monotonic()
    generated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    files = {"html": HTML, "flagged_parquet": "flagged.parquet", "flagged_csv": "flagged.csv", "summary": SUMMARY}
    page = render_page(info, result, shown.src, shown.reason, generated, files, full_of=shown.full,
                  threshold_meaning=settings.threshold_note, extra_warnings=shown.warnings(),
                  groups=sheets, groups_url=groups_url or "", boxes_of=shown.region_boxes)
    fsio.write_bytes(fsio.join(output_url, HTML), page.encode("utf-8"))
    t_html = time.monotonic()

    summary = _summary(results_url, output_url, truth_url, generated, cfg, settings, info, result, shown, files)
    if sheets:
        summary["duplicate_groups"] = {"duplicates": groups_url, "shown": [
            {"group_id": s.group_id, "size": s.size, "representative": s.representative} for s in sheets]}
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
