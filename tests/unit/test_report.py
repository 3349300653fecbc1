"""Unit tests of the audit report pieces (no Spark): the streaming scan against a pandas
reference, the exact top-N under arbitrary batch splits, escaping, thumbnails, config rules."""
from __future__ import annotations

import io
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from retrieval import config as config_mod
from retrieval.report.html import ENV, band_of, confident_edge, histogram_svg, tick, wrap_path
from retrieval.report.roots import InputRoots
from retrieval.report.runinfo import compact
from retrieval.report.scan import ScanSettings, _csv_safe, _TopQueries, band_labels, scan
from retrieval.report.thumbs import make_images, make_thumbnail, make_thumbnails, thumb_name
from retrieval.extract.preprocess import DecodePolicy
from retrieval.schema import RESULT_REQUIRED
from retrieval.schema import RESULT_SCHEMA as FULL_SCHEMA

# result files as written before score normalisation (no norm_score column): still read
RESULT_SCHEMA = pa.schema([FULL_SCHEMA.field(n) for n in RESULT_REQUIRED])


def _random_results(n_queries: int, k: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_queries):
        scores = np.sort(rng.uniform(-0.2, 1.0, k).astype(np.float32))[::-1]
        for r, s in enumerate(scores, start=1):
            rows.append((f"q{q:05d}", r, f"g{rng.integers(0, 10 * n_queries):06d}", s, s - 0.05,
                         f"s3://b/q/{q}.jpg", f"s3://b/g/{r}.jpg"))
    df = pd.DataFrame(rows, columns=RESULT_SCHEMA.names)
    df["rank"] = df["rank"].astype(np.int32)
    df[["score", "coarse_score"]] = df[["score", "coarse_score"]].astype(np.float32)
    return df


def _write_parts(df: pd.DataFrame, root: str, n_parts: int, seed: int) -> list[str]:
    """Rows shuffled across ``n_parts`` files, so a query's rows are split between files."""
    os.makedirs(root, exist_ok=True)
    perm = np.random.default_rng(seed).permutation(len(df))
    files = []
    for i, chunk in enumerate(np.array_split(perm, n_parts)):
        path = os.path.join(root, f"part-{i:05d}.parquet")
        pq.write_table(pa.Table.from_pandas(df.iloc[chunk], schema=RESULT_SCHEMA, preserve_index=False),
                       path, row_group_size=97)
        files.append(path)
    return files


@pytest.mark.parametrize("seed", [0, 1])
def test_scan_matches_a_pandas_reference(tmp_path, seed):
    df = _random_results(400, 7, seed)
    files = _write_parts(df, str(tmp_path / "res"), 3, seed)
    st = ScanSettings(threshold=0.8, bands=(0.3, 0.5, 0.8, 0.9), top_queries=15, matches_per_query=3,
                      histogram_bins=20, batch_rows=101)
    res = scan(files, str(tmp_path / "out"), st, total_rows=len(df))
    flagged = df[df.score >= np.float32(0.8)]
    assert res.rows == len(df) and res.queries == 400
    assert res.flagged_rows == len(flagged)
    assert res.flagged_queries == flagged.query_id.nunique()
    assert sum(res.hist_counts) == len(df)
    assert res.band_matches == np.bincount(np.searchsorted(np.float32(st.bands), df.score, side="right"),
                                           minlength=5).tolist()
    best = flagged.groupby("query_id").score.max().reset_index()
    best = best.sort_values(["score", "query_id"], ascending=[False, True]).head(15)
    assert [fq.query_id for fq in res.top] == best.query_id.tolist()
    for fq in res.top:
        mine = flagged[flagged.query_id == fq.query_id].sort_values("score", ascending=False).head(3)
        assert [m.gallery_id for m in fq.matches] == mine.gallery_id.tolist()
        assert all(m.score >= 0.8 - 1e-6 for m in fq.matches)
    written = pq.read_table(tmp_path / "out" / "flagged.parquet").to_pandas()
    assert len(written) == len(flagged) and set(written.query_id) == set(flagged.query_id)
    assert res.more_flagged_queries == flagged.query_id.nunique() - 15


@pytest.mark.parametrize("seed", range(5))
def test_top_queries_exact_under_any_split(seed):
    """Offer each query's scores in random pieces and orders: the kept set is the true top-N."""
    rng = np.random.default_rng(seed)
    scores = {f"q{i}": rng.choice([0.8, 0.85, 0.9, 0.95], size=rng.integers(1, 5)).tolist() for i in range(60)}
    pieces = [(q, s) for q, ss in scores.items() for s in ss]
    rng.shuffle(pieces)
    top = _TopQueries(7)
    for chunk in np.array_split(np.arange(len(pieces)), 13):
        by_q: dict[str, float] = {}
        for i in chunk:
            q, s = pieces[i]
            by_q[q] = max(by_q.get(q, -1.0), s)
        top.offer(list(by_q), np.array(list(by_q.values())))
    want = sorted(((q, max(ss)) for q, ss in scores.items()), key=lambda kv: (-kv[1], kv[0]))[:7]
    assert top.ranked() == want


def test_band_labels_and_histogram_svg():
    assert band_labels([0.5, 0.8]) == ["< 0.5", "0.5 - 0.8", ">= 0.8"]
    svg = histogram_svg([0.0, 0.25, 0.5, 0.75, 1.0], [10, 0, 3, 1000], threshold=0.75)
    assert svg.count("<rect") == 1 + 3                 # frame + three non-empty bars
    assert "0.750 - 1.000: 1,000 matches" in svg and "threshold 0.75" in svg
    assert 'fill="#b3261e"' in svg and 'fill="#8fa3bf"' in svg and "nan" not in svg.lower()
    assert "<rect" in histogram_svg([0.0, 1.0], [0], threshold=0.5)   # empty histogram still renders
    # bars by band: below the threshold, review (threshold .. confident edge), confident
    svg = histogram_svg([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], [1, 1, 1, 1, 1], threshold=0.7, confident=0.9)
    fills = re.findall(r'<rect [^>]*fill="(#[0-9a-f]+)"><title>', svg)
    assert fills == ["#8fa3bf", "#8fa3bf", "#d98a00", "#d98a00", "#b3261e"]


@pytest.mark.parametrize("lo", [-0.5, -0.3, -0.1, -0.45, -1.0])
def test_histogram_axis_labels_are_sane(lo):
    """Ticks are multiples of the step, labelled without trailing zeros and never "-0"/"-0.00"
    (the accumulated float error of lo + k * step used to print "-0.00")."""
    edges = np.linspace(lo, 1.0, 41).tolist()
    svg = histogram_svg(edges, [1] * 40, threshold=0.2)
    labels = re.findall(r'text-anchor="middle">([^<]*)</text>', svg)
    ticks = [t for t in labels if re.fullmatch(r"-?[0-9.]+", t)]
    assert "0" in ticks and not any(t.startswith("-0") and float(t) == 0 for t in ticks), ticks
    assert all(not re.search(r"\.\d*0$", t) for t in ticks), ticks
    values = [float(t) for t in ticks]
    assert values == sorted(values) and values[0] >= lo - 1e-9 and values[-1] <= 1.0 + 1e-9
    steps = {round(b - a, 6) for a, b in zip(values, values[1:])}
    assert len(steps) == 1, ticks


def test_tick_wrap_path_and_bands():
    assert [tick(v) for v in (-0.0, -1e-17, 0.0, 0.5, -0.5, 1.0, 0.25, 0.30000000000000004)] == \
        ["0", "0", "0", "0.5", "-0.5", "1", "0.25", "0.3"]
    wrapped = str(wrap_path("/data/my_photos/IMG-0001.final.jpg"))
    assert wrapped == "/<wbr>data/<wbr>my_<wbr>photos/<wbr>IMG-<wbr>0001.<wbr>final.<wbr>jpg"
    assert wrapped.replace("<wbr>", "") == "/data/my_photos/IMG-0001.final.jpg"
    assert "averyveryverylongwordwithoutseparators" in str(wrap_path("s3://b/averyveryverylongwordwithoutseparators"))
    # escaped before the <wbr> are added: a hostile path stays text
    assert str(wrap_path('/x/<script>"a"')) == "/<wbr>x/<wbr>&lt;script&gt;&quot;a&quot;"
    assert confident_edge([0.5, 0.75, 0.9, 0.95], 0.75) == 0.95
    assert confident_edge([0.5, 0.6], 0.75) == 0.75           # no edge above the threshold
    assert [band_of(s, 0.75, 0.95) for s in (0.96, 0.95, 0.9499, 0.75, 0.7499, None, float("nan"))] == \
        ["confident", "confident", "review", "review", "below", "below", "below"]
    assert band_of(np.float32(0.75), 0.75, 0.95) == "review"   # float32 score at the threshold: flagged


def test_input_roots(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "sub" / "a.jpg").write_bytes(b"x")
    os.symlink("/etc/passwd", photos / "sneaky.jpg")
    roots = InputRoots.from_inputs([str(photos), "s3://bucket/gallery/", str(tmp_path / "lists" / "q.csv"), None])
    assert roots.allows(str(photos / "sub" / "a.jpg")) and roots.allows(f"file://{photos}/sub/a.jpg")
    assert roots.allows("s3://bucket/gallery/x/1.jpg") and roots.allows("s3://bucket/gallery/p.parquet#row=3")
    assert roots.allows(str(tmp_path / "lists" / "img.jpg"))           # a file input roots its directory
    for bad in ["/etc/passwd", str(photos / ".." / "other.jpg"), str(photos / "sneaky.jpg"),
                str(photos) + "-evil/x.jpg", "s3://bucket/gallery-2/x.jpg", "s3://bucket/gallery/../x.jpg",
                "gs://bucket/gallery/x.jpg", "", None]:
        assert not roots.allows(bad), bad
    assert not InputRoots.from_inputs([]).allows("/etc/passwd")
    assert InputRoots.from_inputs([]).describe() == "none recorded"


def test_full_size_copies(tmp_path):
    img = Image.new("RGB", (2400, 1200), (20, 120, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    thumb, full = make_images(buf.getvalue(), 256, full_size=1600)
    assert (thumb.width, thumb.height) == (256, 128)
    assert Image.open(io.BytesIO(full)).size == (1600, 800)
    small, full = make_images(Image.new("RGB", (300, 200)).tobytes(), 256, full_size=1600)
    assert small.jpeg is None and full is None                        # raw pixels are not an image
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    thumbs = make_thumbnails([str(tmp_path / "a.png"), str(tmp_path / "gone.png")], 256, full_size=1024,
                             output_url=str(out))
    t = thumbs[str(tmp_path / "a.png")]
    assert re.fullmatch(r"full/[0-9a-f]{32}\.jpg", t.full)
    assert Image.open(out / t.full).size == (1024, 512) and thumbs[str(tmp_path / "gone.png")].full is None


def test_escaping_and_csv_formula_neutralisation():
    # the report templates' autoescape, spelled as html.escape does (quotes included)
    assert ENV.from_string("{{ v }}").render(v='<script>"x"&\'y\'</script>') == \
        "&lt;script&gt;&quot;x&quot;&amp;&#x27;y&#x27;&lt;/script&gt;"
    t = pa.table({"query_id": ["=1+1", "+x", "-y", "@z", "ok", None], "rank": [1, 2, 3, 4, 5, 6]})
    safe = _csv_safe(t).column("query_id").to_pylist()
    assert safe == ["'=1+1", "'+x", "'-y", "'@z", "ok", None]
    assert _csv_safe(t).column("rank").to_pylist() == [1, 2, 3, 4, 5, 6]


def test_thumbnails(tmp_path):
    img = Image.new("RGB", (640, 320), (200, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    t = make_thumbnail(buf.getvalue(), 96)
    assert t.error is None and (t.width, t.height) == (96, 48)
    assert Image.open(io.BytesIO(t.jpeg)).format == "JPEG" and t.data_uri().startswith("data:image/jpeg;base64,")
    assert "not an image" in make_thumbnail(b"<html><body>hi</body></html>", 96).error
    bomb = make_thumbnail(buf.getvalue(), 96, DecodePolicy(max_pixels=1000))
    assert bomb.jpeg is None and "too many pixels" in bomb.error
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    thumbs = make_thumbnails([str(tmp_path / "a.png"), str(tmp_path / "gone.png"), "", str(tmp_path / "a.png")],
                             64, threads=2)
    assert len(thumbs) == 3 and thumbs[str(tmp_path / "a.png")].jpeg is not None
    assert "missing file" in thumbs[str(tmp_path / "gone.png")].error and thumbs[""].error == "no uri"
    assert re.fullmatch(r"[0-9a-f]{32}\.jpg", thumb_name("../../etc/passwd"))


def test_report_config_rules():
    cfg = config_mod.load()
    assert cfg["report.threshold"] == "auto" and cfg["report.thumbnails"] == "embed"
    assert cfg["report.target_fmr"] == 0.003
    assert cfg["report.thumbnail_size"] >= 256 and cfg["report.full_size"] > cfg["report.thumbnail_size"]
    for key, bad in [("report.full_size", 100), ("report.full_size", -1), ("report.bands", [0.9, 0.5]),
                     ("report.bands", [0.5, 2.0]), ("report.threshold", 1.5),
                     ("report.threshold", "fixed"), ("report.target_fmr", 0.0), ("report.target_fmr", 1.0),
                     ("report.thumbnails", "inline"), ("report.top_queries", -1)]:
        with pytest.raises(config_mod.ConfigError, match=re.escape(key)):
            config_mod.load(overrides={key: bad})


def test_compact_bounds_strings():
    out = compact({"a": "x" * 500, "b": [1, 2.5, None, True], "c": {"d": ("y",)}}, max_len=50)
    assert len(out["a"]) == 50 and out["a"].endswith("...")
    assert out["b"] == [1, 2.5, None, True] and out["c"] == {"d": ["y"]}


@pytest.mark.parametrize("width", [1280, 390])
def test_docs_screenshots_are_current_pages(width):
    """docs/report-<width>.png (scripts/report_screenshots.sh): checked in, embedded in
    docs/report.md, small, the top 2000 px of a rendered page that shows the band colours."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(repo, "docs", f"report-{width}.png")
    assert os.path.getsize(path) < 400_000
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (width, 2000)
        rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    assert rgb.std() > 20
    # a confident block's red edge, the review chip (legend, scores); at 1280 px a review block's amber edge
    colours = [(0xb3, 0x26, 0x1e), (0xff, 0xf0, 0xd1)] + ([(0xd9, 0x8a, 0x00)] if width == 1280 else [])
    for colour in colours:
        near = (np.abs(rgb - np.array(colour)).max(axis=2) <= 12).sum()
        assert near > 500, (colour, near)
    with open(os.path.join(repo, "docs", "report.md"), encoding="utf-8") as fh:
        assert f"(report-{width}.png)" in fh.read()
