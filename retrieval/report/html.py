"""The report page: one self-contained HTML file (inline CSS, inline SVG histogram, thumbnails as
``data:`` URIs or relative ``thumbs/*.jpg``, each a plain link to its relative ``full/*.jpg``), no
script, no external resource. Built for review: a how-to-review note (band legend, the
``threshold_meaning`` sentence), the flagged pairs first, scores coloured by band
(:func:`band_of`: confident / review / below), paths wrapped at separators (:func:`wrap_path`),
axis ticks without ``-0`` (:func:`tick`), the settings collapsed at the end.

The markup lives in jinja2 templates (``retrieval/report/templates/``: ``report.html.j2`` the page,
``macros.html.j2`` its tables and flagged-query blocks, ``histogram.svg.j2`` the chart); this module
prepares the values. The environment autoescapes every ``{{ value }}``, so an id like ``<script>``
renders as text, whatever template prints it. Its ``finalize`` hook spells the entities as
``html.escape`` does (``&quot;`` and ``&#x27;`` where markupsafe writes ``&#34;`` / ``&#39;``), so the
page is byte-identical to the one built before the templates. A Content-Security-Policy meta tag
(in ``report.html.j2``) forbids scripts and remote loads as a second line of defence.
"""
from __future__ import annotations

import html
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jinja2
import numpy as np
from markupsafe import Markup

from retrieval.report.runinfo import RunInfo, StageInfo
from retrieval.report.scan import ScanResult


def _escape(value: Any) -> Any:
    """The ``finalize`` of every ``{{ value }}``: markup (a macro's output, a ``{% set %}`` block) as
    is, anything else ``html.escape``-d (quotes included; ``None`` is empty). Autoescaping stays on
    behind it: what this returns is already ``Markup``, so jinja2 does not escape it twice."""
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def num(value: Any, digits: int = 3) -> str:
    """A table cell's number (thousands separators, ``digits`` decimals); ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:,.{digits}f}"
    return str(value)


_SEPARATORS = re.compile(r"([/_\-.#=?&])")


def wrap_path(value: Any) -> Markup:
    """A path or URL, escaped, with a ``<wbr>`` after each separator (``/ _ - . # = ? &``): a long
    path wraps at its separators, never mid-word."""
    if value is None:
        return Markup("")
    parts = _SEPARATORS.split(str(value))      # separators at the odd indices
    return Markup("".join(html.escape(p, quote=True) + ("<wbr>" if i % 2 else "") for i, p in enumerate(parts)))


def tick(value: float, digits: int = 2) -> str:
    """An axis tick label: ``digits`` decimals at most, trailing zeros dropped, never ``-0``."""
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0", "0") else text


BANDS = ("confident", "review", "below")


def confident_edge(bands: Sequence[float], threshold: float) -> float:
    """Where ``confident`` starts: the highest band edge above the threshold (``report.bands[-1]``
    by default), or the threshold itself when no edge is above it."""
    above = [float(b) for b in bands if np.float32(b) > np.float32(threshold)]
    return max(above) if above else float(threshold)


def band_of(score: float | None, threshold: float, confident: float) -> str:
    """``confident`` (>= the confident edge), ``review`` (>= threshold) or ``below``, compared in
    float32 as the scan compares scores."""
    if score is None or not math.isfinite(score):
        return "below"
    s = np.float32(score)
    return "confident" if s >= np.float32(confident) else "review" if s >= np.float32(threshold) else "below"


ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("retrieval.report", "templates"),
    autoescape=True, finalize=_escape, undefined=jinja2.StrictUndefined,
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, auto_reload=False)
ENV.filters["num"] = num
ENV.filters["fmt"] = format        # {{ x|fmt(".3f") }} is f"{x:.3f}"
ENV.filters["path"] = wrap_path
ENV.filters["tick"] = tick
ENV.globals["zip"] = zip

BAR_COLOURS = {"confident": "#b3261e", "review": "#d98a00", "below": "#8fa3bf"}
SCORE_LABELS = {"score": "score (512-d cosine)",
                "norm_score": "normalised score (512-d cosine - beta x background level)"}


def _histogram(edges: Sequence[float], counts: Sequence[int], threshold: float,
               width: int, height: int, label: str, confident: float | None = None) -> dict[str, Any]:
    """The chart's geometry, for ``histogram.svg.j2``; bars coloured by band (``confident`` edge
    defaults to the threshold: two colours)."""
    confident = threshold if confident is None else confident
    left, right, top, bottom = 56, 12, 22, 34
    pw, ph = width - left - right, height - top - bottom
    lo, hi = edges[0], edges[-1]
    peak = max(counts) if counts else 0
    scale = math.log10(1 + peak) if peak else 1.0

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    grid = []             # (y, count) of the log-scale grid lines
    for k in range(0, int(math.floor(scale)) + 1):
        y = top + ph - (math.log10(1 + 10 ** k) / scale) * ph if peak else top + ph
        if y >= top - 0.5:
            grid.append((y, 10 ** k))
    bars = []             # (x, y, width, height, colour, bin start, bin end, count) of the non-empty bins
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        if c <= 0:
            continue
        h = math.log10(1 + c) / scale * ph
        bars.append((x(a) + 0.5, top + ph - h, max(x(b) - x(a) - 1, 1), h,
                     BAR_COLOURS[band_of(a + 1e-6, threshold, confident)], a, b, c))
    # (x, label) of the score axis: integer multiples of the step (no accumulated float error),
    # labels without trailing zeros and never "-0"
    step = 0.2 if hi - lo > 1.0 else 0.1 if hi - lo > 0.5 else 0.05
    first, last = math.ceil(lo / step - 1e-6), math.floor(hi / step + 1e-6)
    ticks = [(x(i * step), tick(i * step)) for i in range(first, last + 1)]
    return {"width": width, "height": height, "left": left, "top": top, "pw": pw, "ph": ph,
            "grid": grid, "bars": bars, "ticks": ticks, "threshold": threshold,
            "threshold_x": x(threshold) if lo <= threshold <= hi else None, "label": label}


def histogram_svg(edges: Sequence[float], counts: Sequence[int], threshold: float,
                  width: int = 760, height: int = 240, label: str = "score (512-d cosine)",
                  confident: float | None = None) -> str:
    """Bars of ``counts`` on a log scale coloured by band (confident / review / below), a dashed
    line at the threshold; every bar has a tooltip with its exact count."""
    macro = ENV.get_template("histogram.svg.j2").module.histogram
    return str(macro(_histogram(edges, counts, threshold, width, height, label, confident)))


def _stage_rows(stages: Sequence[StageInfo]) -> list[list[Any]]:
    rows = []
    for s in stages:
        c = s.counts
        if s.name == "search":
            inputs, ok, errors = c.get("queries"), c.get("queries_with_results"), c.get("query_errors")
        else:
            inputs, ok, errors = c.get("inputs"), c.get("ok"), c.get("errors")
        total = s.timings.get("total_s") if isinstance(s.timings, Mapping) else None
        rows.append([s.name, s.url if s.available else f"unavailable: {s.problem}", inputs, ok, errors, total])
    return rows


def _band_rows(scan: ScanResult, threshold: float, confident: float) -> list[list[Any]]:
    """``[label, matches, queries, band]`` per score band; a band straddling the threshold or the
    confident edge takes the lower class it reaches above the threshold (``review``)."""
    edges = [-math.inf, *scan.settings.bands, math.inf]
    rows = []
    for i, (label, bm, bq) in enumerate(zip(scan.band_labels, scan.band_matches, scan.band_queries)):
        lo, hi = edges[i], edges[i + 1]
        band = "below" if hi <= threshold + 1e-9 else "confident" if lo >= confident - 1e-9 else "review"
        rows.append([label, bm, bq, band])
    return rows


def render_page(info: RunInfo, scan: ScanResult, src_of: Callable[[str], str | None],
           reason_of: Callable[[str], str], generated: str, files: Mapping[str, str],
           full_of: Callable[[str], str | None] = lambda uri: None, threshold_meaning: str = "",
           extra_warnings: Sequence[str] = (), groups: Sequence[Any] = (), groups_url: str = "",
           boxes_of: Callable[[Any], list] = lambda fq: []) -> str:
    """The page (``report.html.j2``); ``src_of(uri)`` is a thumbnail's ``src`` (None: no thumbnail,
    then ``reason_of(uri)`` says why), ``full_of(uri)`` the relative link to its full-size copy
    (None: no link); ``threshold_meaning`` is the review note's sentence on what the threshold
    means; ``extra_warnings`` go with the page's own warnings at the top; ``groups``: the
    near-duplicate groups' contact sheets (:mod:`retrieval.report.groups`) of ``groups_url``;
    ``boxes_of(fq)`` the query regions drawn over a flagged query's thumbnail
    (:meth:`~retrieval.report.shown.ShownImages.region_boxes`)."""
    st = scan.settings
    confident = confident_edge(st.bands, st.threshold)
    m = info.manifest
    search_counts = info.stage("search").counts
    queries = search_counts.get("queries", scan.queries)
    errors_total = sum(int(s.counts.get("errors") or 0) for s in info.stages if s.name != "search") + \
        int(search_counts.get("query_errors") or 0)
    cards = [("queries", queries, False), ("flagged queries", scan.flagged_queries, scan.flagged_queries > 0),
             ("flagged matches", scan.flagged_rows, scan.flagged_rows > 0), ("result rows", scan.rows, False),
             ("errors (all stages)", errors_total, errors_total > 0)]
    if scan.truth and scan.truth.get("precision") is not None:
        cards.append(("precision vs truth", scan.truth["precision"], False))

    warnings = [f"Model versions differ: {p}" for p in info.version_problems()]
    warnings += [f"{s.name}: {s.problem}" for s in info.stages if s.problem]
    if scan.nonfinite_scores:
        warnings.append(f"{scan.nonfinite_scores:,} result rows have a NaN/inf score (not counted in bands)")
    warnings += list(extra_warnings)

    index = info.stage("index")
    versions = [["model_version (search)", m.get("model_version")]]
    for s in info.stages:
        if s.model_versions:
            versions.append([f"model_version ({s.name})", ", ".join(s.model_versions)])
    versions += [[f"index {k}", v] for k, v in index.details.items()]
    versions += [[f"search {k[6:]}", v] for k, v in info.stage("search").details.items() if k.startswith("param.")]
    timing_rows = []
    for s in info.stages:
        if isinstance(s.timings, Mapping):
            for k, v in s.timings.items():
                if k.endswith("_s") and "_per_" not in k and isinstance(v, (int, float)) and not isinstance(v, bool):
                    timing_rows.append([s.name, k, float(v)])
    return ENV.get_template("report.html.j2").render(
        info=info, scan=scan, st=st, src_of=src_of, reason_of=reason_of, generated=generated, files=files,
        score_label=SCORE_LABELS[st.score_column], cards=cards, warnings=warnings,
        full_of=full_of, threshold_meaning=threshold_meaning, confident=confident, boxes_of=boxes_of,
        band_of=lambda score: band_of(score, st.threshold, confident),
        stage_rows=_stage_rows(info.stages), band_rows=_band_rows(scan, st.threshold, confident),
        versions=versions, timing_rows=timing_rows, groups=groups, groups_url=groups_url,
        truth_rows=[[k, v] for k, v in scan.truth.items()] if scan.truth else None,
        flagged_parquet=files.get("flagged_parquet", "flagged.parquet"),
        hist=_histogram(scan.hist_edges, scan.hist_counts, st.threshold, 760, 240, SCORE_LABELS[st.score_column],
                        confident))
