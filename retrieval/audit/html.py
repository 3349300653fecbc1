"""The report page: one self-contained HTML file (inline CSS, inline SVG histogram, thumbnails as
``data:`` URIs or relative ``thumbs/*.jpg``), no script, no external resource.

Every value that comes from data (ids, URIs, error messages, manifest fields) passes through
:func:`esc` (``html.escape`` with quotes), so an id like ``<script>`` renders as text. A
Content-Security-Policy meta tag forbids scripts and remote loads as a second line of defence.
"""
from __future__ import annotations

import html
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

from retrieval.audit.runinfo import RunInfo, StageInfo
from retrieval.audit.scan import FlaggedQuery, ScanResult

CSP = "default-src 'none'; img-src data: 'self'; style-src 'unsafe-inline'"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d232a;background:#f5f6f8}
main{max-width:1180px;margin:0 auto;padding:20px 28px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #d6dae0;padding-bottom:4px}
.meta{color:#5b6570;margin:0;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#fff;border:1px solid #d6dae0;border-radius:8px;padding:10px 16px;min-width:140px}
.card b{display:block;font-size:22px}.card span{color:#5b6570;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card.alert b{color:#b3261e}
table{border-collapse:collapse;background:#fff;border:1px solid #d6dae0;margin:6px 0 4px;font-size:13px}
th,td{padding:5px 10px;border-bottom:1px solid #e6e9ed;text-align:left;vertical-align:top}
th{background:#eef0f3;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:0 28px}
.warn{background:#fff4e5;border:1px solid #f0b35b;border-radius:6px;padding:8px 12px;margin:8px 0}
.q{display:flex;gap:14px;background:#fff;border:1px solid #d6dae0;border-radius:8px;padding:12px;margin:10px 0}
.q .src{flex:0 0 168px;border-right:1px solid #e6e9ed;padding-right:12px}
.matches{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:150px;font-size:12px}
figure img,.ph{display:block;width:140px;height:140px;object-fit:contain;background:#eef0f3;border-radius:4px}
.ph{display:flex;align-items:center;justify-content:center;text-align:center;color:#8a939c;font-size:11px;padding:6px;box-sizing:border-box;overflow:hidden}
figcaption{margin-top:4px;word-break:break-all}
.id{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.uri{color:#5b6570;font-size:11px}
.score{font-weight:700}.hi{color:#b3261e}
.tag{display:inline-block;border-radius:3px;padding:0 5px;font-size:11px;margin-left:4px}
.tp{background:#d7f2dc;color:#1b5e20}.fp{background:#fde2e0;color:#8c1d18}
.more{font-weight:600;margin:14px 0}
details{margin:6px 0}summary{cursor:pointer}
footer{margin-top:30px;color:#5b6570;font-size:12px}
svg text{font:11px system-ui,"DejaVu Sans",sans-serif;fill:#3d4650}
"""


def esc(value: Any) -> str:
    """Text or attribute value, HTML-escaped (quotes included)."""
    return html.escape("" if value is None else str(value), quote=True)


def num(value: Any, digits: int = 3) -> str:
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
    return esc(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(headers)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for v, isnum in zip(row, numeric):
            cells.append(f'<td class="n">{num(v)}</td>' if isnum else f"<td>{esc('-' if v is None else v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


SCORE_LABELS = {"score": "score (512-d cosine)",
                "norm_score": "normalised score (512-d cosine - beta x background level)"}

def histogram_svg(edges: Sequence[float], counts: Sequence[int], threshold: float,
                  width: int = 760, height: int = 240, label: str = "score (512-d cosine)") -> str:
    """Bars of ``counts`` on a log scale, bins at or above ``threshold`` in red, a dashed line at
    the threshold; every bar has a tooltip with its exact count."""
    left, right, top, bottom = 56, 12, 22, 34
    pw, ph = width - left - right, height - top - bottom
    lo, hi = edges[0], edges[-1]
    peak = max(counts) if counts else 0
    scale = math.log10(1 + peak) if peak else 1.0

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="score histogram">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#d6dae0"/>']
    for k in range(0, int(math.floor(scale)) + 1):
        y = top + ph - (math.log10(1 + 10 ** k) / scale) * ph if peak else top + ph
        if y < top - 0.5:
            continue
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eef0f3"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{10 ** k:,}</text>')
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        if c <= 0:
            continue
        h = math.log10(1 + c) / scale * ph
        colour = "#d9534f" if a >= threshold - 1e-9 else "#5b8def"
        parts.append(f'<rect x="{x(a) + 0.5:.1f}" y="{top + ph - h:.1f}" width="{max(x(b) - x(a) - 1, 1):.1f}" '
                     f'height="{h:.1f}" fill="{colour}"><title>{a:.3f} - {b:.3f}: {c:,} matches</title></rect>')
    step = 0.1 if hi - lo > 0.5 else 0.05
    t = math.ceil(lo / step) * step
    while t <= hi + 1e-9:
        parts.append(f'<text x="{x(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{t:.2f}</text>')
        t += step
    if lo <= threshold <= hi:
        parts.append(f'<line x1="{x(threshold):.1f}" x2="{x(threshold):.1f}" y1="{top}" y2="{top + ph}" '
                     'stroke="#b3261e" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{x(threshold):.1f}" y="{top - 6}" text-anchor="middle" fill="#b3261e">'
                     f'threshold {threshold:g}</text>')
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 4}" text-anchor="middle">{esc(label)}</text>')
    parts.append(f'<text transform="translate(12 {top + ph / 2:.0f}) rotate(-90)" text-anchor="middle">'
                 'matches (log scale)</text>')
    parts.append("</svg>")
    return "".join(parts)


def _image(uri: str, src_of: Callable[[str], str | None], reason_of: Callable[[str], str], alt: str) -> str:
    src = src_of(uri)
    if src:
        return f'<img src="{esc(src)}" alt="{esc(alt)}">'
    reason = reason_of(uri)
    return f'<div class="ph" title="{esc(reason)}">no thumbnail<br>{esc(reason[:80])}</div>'


def _flagged_block(fq: FlaggedQuery, threshold: float, src_of, reason_of) -> str:
    figs = []
    for m in fq.matches:
        tag = ""
        if m.true_match is True:
            tag = '<span class="tag tp">true match</span>'
        elif m.true_match is False:
            tag = '<span class="tag fp">not in truth</span>'
        cls = "score hi" if m.score >= threshold - 1e-6 else "score"
        coarse = "" if m.coarse_score is None else f" &middot; coarse {m.coarse_score:.3f}"
        if m.cosine is not None:
            coarse = f" &middot; cosine {m.cosine:.3f}{coarse}"
        figs.append(
            f'<figure>{_image(m.gallery_uri, src_of, reason_of, m.gallery_id)}<figcaption>'
            f'#{m.rank} <span class="{cls}">{m.score:.3f}</span>{coarse}{tag}<br>'
            f'<span class="id">{esc(m.gallery_id)}</span><br><span class="uri">{esc(m.gallery_uri)}</span>'
            f'</figcaption></figure>')
    return (f'<div class="q"><div class="src"><figure>{_image(fq.query_uri, src_of, reason_of, fq.query_id)}'
            f'<figcaption>query <span class="id">{esc(fq.query_id)}</span><br>best '
            f'<span class="score hi">{fq.best:.3f}</span><br><span class="uri">{esc(fq.query_uri)}</span>'
            f'</figcaption></figure></div><div class="matches">{"".join(figs)}</div></div>')


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


def render(info: RunInfo, scan: ScanResult, src_of: Callable[[str], str | None],
           reason_of: Callable[[str], str], generated: str, files: Mapping[str, str]) -> str:
    st = scan.settings
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
    card_html = "".join(f'<div class="card{" alert" if alert else ""}"><b>{num(v)}</b><span>{esc(k)}</span></div>'
                        for k, v, alert in cards)

    warnings = [f"Model versions differ: {p}" for p in info.version_problems()]
    warnings += [f"{s.name}: {s.problem}" for s in info.stages if s.problem]
    if scan.nonfinite_scores:
        warnings.append(f"{scan.nonfinite_scores:,} result rows have a NaN/inf score (not counted in bands)")
    warn_html = "".join(f'<div class="warn">{esc(w)}</div>' for w in warnings)

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

    bands = [[label, bm, bq] for label, bm, bq in zip(scan.band_labels, scan.band_matches, scan.band_queries)]
    truth_html = ""
    if scan.truth:
        truth_html = "<h2>Ground truth</h2>" + _table(
            ["figure", "value"], [[k, v] for k, v in scan.truth.items()], [False, True])

    if scan.top:
        shown = "".join(_flagged_block(fq, st.threshold, src_of, reason_of) for fq in scan.top)
        more = (f'<p class="more">{scan.more_flagged_queries:,} more flagged queries in '
                f'{esc(files.get("flagged_parquet", "flagged.parquet"))}</p>') if scan.more_flagged_queries else ""
        flagged_html = (f"<p>The {len(scan.top):,} flagged queries with the highest best score (of "
                        f"{scan.flagged_queries:,}), each with up to {st.matches_per_query} of its matches at or "
                        f"above the threshold {st.threshold:g}.</p>{more}{shown}{more}")
    elif scan.flagged_queries:
        flagged_html = (f'<p class="more">{scan.flagged_queries:,} flagged queries in '
                        f'{esc(files.get("flagged_parquet", "flagged.parquet"))} (none shown: report.top_queries=0)</p>')
    else:
        flagged_html = f"<p>No match at or above the threshold {st.threshold:g}.</p>"

    err_parts = []
    for s in info.stages:
        if s.error_samples:
            err_parts.append(f"<details><summary>{esc(s.name)}: {num(s.counts.get('errors'))} errors "
                             f"(first {len(s.error_samples)} shown)</summary>"
                             + _table(["image_id", "uri", "error"], s.error_samples) + "</details>")
    errors_html = "".join(err_parts) or "<p>No error rows recorded.</p>"
    score_range = (f"scores {scan.score_min:.3f} .. {scan.score_max:.3f}" if scan.score_min is not None
                   else "no scores")
    file_links = " &middot; ".join(f'<a href="{esc(v)}">{esc(v)}</a>' for v in files.values())

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>Copy-detection audit report</title>
<style>{CSS}</style></head>
<body><main>
<header><h1>Copy-detection audit report</h1>
<p class="meta">results {esc(info.results_url)} &middot; generated {esc(generated)} &middot; flag threshold
{st.threshold:g} ({esc(SCORE_LABELS[st.score_column])})</p></header>
{warn_html}
<section id="summary"><div class="cards">{card_html}</div>
<h2>Stages: inputs and errors</h2>
{_table(["stage", "source", "inputs", "ok", "errors", "total s"], _stage_rows(info.stages),
        [False, False, True, True, True, True])}
<div class="grid"><div><h2>Matches per threshold band</h2>
{_table(["score band", "matches", "queries (best match)"], bands, [False, True, True])}
</div><div><h2>Versions</h2>{_table(["what", "value"], versions)}</div></div>
<div class="grid"><div><h2>Timings</h2>{_table(["stage", "timing", "seconds"], timing_rows, [False, False, True])}</div>
<div>{truth_html}</div></div>
</section>
<section id="histogram"><h2>Score histogram</h2>
<p class="meta">{scan.rows:,} result rows, {score_range}</p>
{histogram_svg(scan.hist_edges, scan.hist_counts, st.threshold, label=SCORE_LABELS[st.score_column])}
</section>
<section id="flagged"><h2>Flagged queries</h2>{flagged_html}</section>
<section id="errors"><h2>Error rows</h2>{errors_html}</section>
<footer>Files: {file_links}</footer>
</main></body></html>
"""
