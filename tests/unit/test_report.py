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
from retrieval.report.html import ENV, histogram_svg
from retrieval.report.runinfo import compact
from retrieval.report.scan import ScanSettings, _csv_safe, _TopQueries, band_labels, scan
from retrieval.report.thumbs import make_thumbnail, make_thumbnails, thumb_name
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
                      hist_bins=20, batch_rows=101)
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
    assert 'fill="#d9534f"' in svg and "nan" not in svg.lower()
    assert "<rect" in histogram_svg([0.0, 1.0], [0], threshold=0.5)   # empty histogram still renders


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
    for key, bad in [("report.bands", [0.9, 0.5]), ("report.bands", [0.5, 2.0]), ("report.threshold", 1.5),
                     ("report.threshold", "fixed"), ("report.target_fmr", 0.0), ("report.target_fmr", 1.0),
                     ("report.thumbnails", "inline"), ("report.top_queries", -1)]:
        with pytest.raises(config_mod.ConfigError, match=re.escape(key)):
            config_mod.load(overrides={key: bad})


def test_compact_bounds_strings():
    out = compact({"a": "x" * 500, "b": [1, 2.5, None, True], "c": {"d": ("y",)}}, max_len=50)
    assert len(out["a"]) == 50 and out["a"].endswith("...")
    assert out["b"] == [1, 2.5, None, True] and out["c"] == {"d": ["y"]}
