"""The search job end to end on real Parquet, a real faiss index (built by the index stage) and
real Spark: library and Spark paths agree, ids map back, bad input is refused, evaluate runs."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from retrieval import config, fsio

from tests import synthetic
from retrieval.search import read_results, search
from retrieval.search.queries import IncompatibleModelError

N, MATCH, NOMATCH = 6000, 150, 150
SPEC = synthetic.SyntheticSpec(n_clusters=300, seed=11)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from retrieval.index.build import build_index

    root = tmp_path_factory.mktemp("search")
    g_coarse, g_fine = synthetic.gallery(N, SPEC)
    gal = str(root / "gallery")
    synthetic.write_feature_output(gal, g_coarse, g_fine, num_files=3, storage="int8", row_group_size=256)
    qc, qfine, source = synthetic.queries(N, MATCH, NOMATCH, SPEC)
    qf = str(root / "queries")
    synthetic.write_feature_output(qf, qc.astype(np.float32), qfine.astype(np.float32), num_files=2,
                                   storage="int8", role="query", id_prefix="q")
    idx = str(root / "index")
    # a quick-to-train index (4-bit PQ) in 3 shards: the merge across shards is exercised
    build_index([gal], idx, config.load(sets=["index.index_key=IVF32,PQ16x4", "index.vectors_per_shard=2000",
                                              "index.quality_queries=100"]), engine=None)
    return {"root": root, "gallery": gal, "queries": qf, "index": idx, "source": source}


def _cfg(**sets):
    # small chunks: several chunks per query file, several tasks per shard
    base = {"search.query_chunk": 64, "search.shortlist": 100, "search.k": 5}
    base.update(sets)
    return config.load(sets=[f"{k}={v}" for k, v in base.items()])


def _rows(url):
    t = read_results(str(url)).to_pydict()
    return list(zip(t["query_id"], t["rank"], t["gallery_id"], t["score"], t["coarse_score"],
                    t["query_uri"], t["gallery_uri"]))


def test_library_and_spark_give_the_same_results(world, spark, tmp_path):
    cfg = _cfg()
    lib = search(world["queries"], world["index"], str(tmp_path / "lib"), cfg, engine=None)
    spk = search(world["queries"], world["index"], str(tmp_path / "spark"), cfg, engine=spark)
    assert lib["counts"] == spk["counts"]
    assert lib["counts"]["queries"] == MATCH + NOMATCH and lib["counts"]["chunks"] == 6
    assert lib["counts"]["shards"] == 3
    assert _rows(tmp_path / "lib") == _rows(tmp_path / "spark")
    # schema and manifest the audit report codes against
    t = pq.read_table(tmp_path / "lib" / "part-00000.parquet")
    assert [f"{f.name}:{f.type}" for f in t.schema] == [
        "query_id:string", "rank:int32", "gallery_id:string", "score:float", "coarse_score:float",
        "query_uri:string", "gallery_uri:string", "norm_score:float", "fmr:double", "fmr_query:double",
        "query_region:string", "signal:string", "distance:int32", "inliers:int32", "geometric_error:string"]
    assert t.column("norm_score").null_count == t.num_rows      # not normalised by default
    assert t.column("fmr").null_count == t.column("fmr_query").null_count == t.num_rows   # no background: no rates
    assert set(t.column("signal").to_pylist()) == {"descriptor"}
    assert t.schema.metadata[b"retrieval.schema_version"] == b"3"
    m = json.loads((tmp_path / "lib" / "_manifest.json").read_text())
    assert m["stage"] == "search" and m["model_version"] == "synthetic-v1"
    assert m["schema_version"] == 3 and m["calibration"] is None
    assert m["index"] == world["index"] and m["query_features"] == world["queries"]
    assert set(m["timings"]) >= {"encode_s", "coarse_s", "merge_s", "rerank_s", "total_s"}
    assert m["counts"]["rows"] == sum(f["rows"] for f in m["files"]) == len(_rows(tmp_path / "lib"))
    assert m["params"]["shortlist"] == 100 and m["params"]["k"] == 5
    # 3 shards, S = 100: each shard returns K' = 53 (the binomial bound), the shuffle plan
    # (shard_cache 2 < 3 shards: coarse tasks per shard group, then a merge task per chunk) ran
    assert m["params"]["shard_shortlist"] == 53 and spk["params"]["shard_shortlist"] == 53
    # every shard in one task's cache: one task per chunk, no shuffle; the same rows
    fused = search(world["queries"], world["index"], str(tmp_path / "fused"), _cfg(**{"search.shard_cache": 3}),
                   engine=spark)
    assert fused["counts"] == lib["counts"] and _rows(tmp_path / "fused") == _rows(tmp_path / "lib")
    # one coarse task per (shard x chunk): the same rows
    single = search(world["queries"], world["index"], str(tmp_path / "single"), _cfg(**{"search.shard_cache": 1}),
                    engine=spark)
    assert single["counts"] == lib["counts"] and _rows(tmp_path / "single") == _rows(tmp_path / "lib")
    # and the local engine's chunk-by-chunk plan for the same case
    search(world["queries"], world["index"], str(tmp_path / "lib_fused"), _cfg(**{"search.shard_cache": 3}))
    assert _rows(tmp_path / "lib_fused") == _rows(tmp_path / "lib")


def test_gallery_major_rerank_reads_each_block_once_and_gives_the_same_rows(world, spark, tmp_path):
    """A 1 MB vector cache against a ~3 MB fine column, 6 query chunks: the chunk-major rerank
    reads the column again for every chunk; the gallery-major one (auto picks it here) reads each
    touched row group once, on both engines and both coarse plans, with the same result rows."""
    from retrieval.search import vectors

    small = {"search.vector_cache_mb": 1, "search.fine_layout": "files"}   # the list layout: test_fine_by_list.py
    vectors._CACHES.clear()            # this process's caches: each run below reads what it needs
    by_chunk = search(world["queries"], world["index"], str(tmp_path / "chunk"),
                      _cfg(**small, **{"search.rerank": "chunk"}), engine=None)
    vectors._CACHES.clear()
    auto = search(world["queries"], world["index"], str(tmp_path / "auto"), _cfg(**small), engine=None)
    spk = search(world["queries"], world["index"], str(tmp_path / "spark"), _cfg(**small), engine=spark)
    fused = search(world["queries"], world["index"], str(tmp_path / "fused"),
                   _cfg(**small, **{"search.shard_cache": 3}), engine=spark)
    assert by_chunk["params"]["rerank"] == "chunk" and by_chunk["blocks"] == []
    for m in (auto, spk, fused):
        assert m["params"]["rerank"] == "gallery" and m["params"]["rerank_configured"] == "auto"
        assert m["params"]["blocks"] == len(m["blocks"]) >= 3
        assert m["counts"] == by_chunk["counts"]
    ref = _rows(tmp_path / "chunk")
    assert ref and _rows(tmp_path / "auto") == ref and _rows(tmp_path / "spark") == ref
    assert _rows(tmp_path / "fused") == ref
    groups = 3 * (N // 3 // 256 + 1)                       # row groups of the 3 gallery files
    io_c, io_g = by_chunk["io"], auto["io"]
    assert io_c["gallery_fine_row_groups_read"] > 2 * groups       # chunks re-read the column
    assert io_g["gallery_fine_row_groups_read"] <= groups          # each group at most once
    assert io_g["gallery_fine_bytes_read"] <= io_g["gallery_fine_column_bytes"]
    assert io_c["gallery_fine_reads_per_column"] > 2 and io_g["gallery_fine_reads_per_column"] <= 1
    assert io_g["gallery_fine_bytes_decoded"] == io_g["gallery_fine_column_decoded_bytes"]
    assert spk["io"]["gallery_fine_row_groups_read"] == io_g["gallery_fine_row_groups_read"]
    # the result rows' image_id/uri: looked up by block too, each label row group read at most once
    assert io_g["gallery_label_row_groups_read"] <= groups < io_c["gallery_label_row_groups_read"]
    assert 0 < io_g["gallery_label_row_groups_read"] and 0 < io_g["gallery_label_bytes_read"]
    assert spk["io"]["gallery_label_row_groups_read"] <= groups
    # the pairs routed to blocks and the kept ones shuffled back, counted the same by both engines
    assert io_g["pairs_scored"] == spk["io"]["pairs_scored"] > 0
    assert io_g["shuffle_bytes"] == spk["io"]["shuffle_bytes"] > 0
    assert io_g["pairs_shuffled_back"] <= io_g["pairs_scored"]
    assert sum(b["pairs"] for b in auto["blocks"]) == io_g["pairs_scored"]
    # with every candidate below a coarse threshold no pair is routed: every chunk is still written
    none = search(world["queries"], world["index"], str(tmp_path / "none"),
                  _cfg(**small, **{"search.rerank": "gallery", "search.coarse_threshold": 0.999}), engine=spark)
    assert none["counts"]["rows"] == 0 and len(none["files"]) == none["counts"]["chunks"] == 6
    # thresholds: the same rows as the chunk-major rerank
    sets = {"search.match_threshold": 0.8, "search.coarse_threshold": 0.3}
    search(world["queries"], world["index"], str(tmp_path / "tc"), _cfg(**small, **sets, **{"search.rerank": "chunk"}))
    search(world["queries"], world["index"], str(tmp_path / "tg"), _cfg(**small, **sets, **{"search.rerank": "gallery"}))
    assert _rows(tmp_path / "tg") == _rows(tmp_path / "tc")


def test_shard_lists_shorter_than_the_shortlist_keep_the_results(world, tmp_path):
    """K' < S (the default) against K' = S (a merge that is always exact): the same result rows
    for all 300 queries (the bound lets a merged shortlist lose tail entries for 1e-4 of them)."""
    auto = search(world["queries"], world["index"], str(tmp_path / "auto"), _cfg(), engine=None)
    exact = search(world["queries"], world["index"], str(tmp_path / "exact"),
                   _cfg(**{"search.shard_shortlist": 100}), engine=None)
    assert auto["params"]["shard_shortlist"] == 53 and exact["params"]["shard_shortlist"] == 100
    assert _rows(tmp_path / "auto") == _rows(tmp_path / "exact")


def test_results_find_sources_and_map_back(world, tmp_path):
    search(world["queries"], world["index"], str(tmp_path / "out"), _cfg(), engine=None)
    rows = _rows(tmp_path / "out")
    top = {q: (g, s, c, qu, gu) for q, r, g, s, c, qu, gu in rows if r == 1}
    src = world["source"]
    hits = sum(top.get(f"q{i:010d}", (None,))[0] == synthetic.image_id(int(src[i])) for i in range(MATCH))
    assert hits / MATCH >= 0.95
    for q, (g, s, c, qu, gu) in list(top.items())[:50]:
        assert qu == f"synthetic://query/{q}" and gu == f"synthetic://gallery/{g}"
        assert -1.0 <= s <= 1.0 + 1e-5 and np.isfinite(c)
    # per query: ranks 1..k, scores non-increasing
    by_q = {}
    for q, r, g, s, *_ in rows:
        by_q.setdefault(q, []).append((r, s))
    for v in by_q.values():
        assert [r for r, _ in v] == list(range(1, len(v) + 1))
        assert all(a[1] >= b[1] for a, b in zip(v, v[1:]))


def test_no_match_and_thresholds(world, tmp_path):
    # coarse threshold above every score: no shortlist, no match, still a complete output
    m = search(world["queries"], world["index"], str(tmp_path / "none"), _cfg(**{"search.coarse_threshold": 0.999}))
    assert m["counts"]["queries_with_results"] == 0 and m["counts"]["rows"] == 0
    assert m["counts"]["queries"] == MATCH + NOMATCH
    # match threshold: exactly the unthresholded results at or above it
    search(world["queries"], world["index"], str(tmp_path / "all"), _cfg())
    full = _rows(tmp_path / "all")
    th = float(np.median([r[3] for r in full if r[1] == 1]))
    m = search(world["queries"], world["index"], str(tmp_path / "th"), _cfg(**{"search.match_threshold": th}))
    rows = _rows(tmp_path / "th")
    assert rows == [r for r in full if r[3] >= th]
    assert 0 < m["counts"]["queries_with_results"] < MATCH + NOMATCH
    assert m["counts"]["queries_with_results"] == len({r[0] for r in rows})


def test_empty_query_set(world, tmp_path):
    qf = str(tmp_path / "empty_q")
    synthetic.write_feature_output(qf, np.zeros((0, 128), np.float32), np.zeros((0, 512), np.float32),
                                   num_files=1, role="query")
    m = search(qf, world["index"], str(tmp_path / "out"), _cfg(), engine=None)
    assert m["counts"]["queries"] == 0 and m["counts"]["rows"] == 0
    assert read_results(str(tmp_path / "out")).num_rows == 0


def test_model_version_mismatch_is_refused(world, tmp_path):
    qf = str(tmp_path / "other_q")
    qc, qfine, _ = synthetic.queries(N, 5, 0, SPEC)
    synthetic.write_feature_output(qf, qc.astype(np.float32), qfine.astype(np.float32), num_files=1,
                                   role="query", model_version="other-model")
    with pytest.raises(IncompatibleModelError, match="other-model.*synthetic-v1|synthetic-v1.*other-model"):
        search(qf, world["index"], str(tmp_path / "out"), _cfg())
    assert not fsio.exists(str(tmp_path / "out" / "_manifest.json"))
    # gallery-role features are not queries
    with pytest.raises(ValueError, match="role query"):
        search(world["gallery"], world["index"], str(tmp_path / "out"), _cfg())
    # query IMAGES with the configured (real) model are refused before anything is encoded
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 10, 10)).save(img_dir / "a.jpg")
    with pytest.raises(IncompatibleModelError, match="configured model"):
        search(str(img_dir), world["index"], str(tmp_path / "out2"), _cfg())
    assert not fsio.exists(str(tmp_path / "out2") + ".query_features/_manifest.json")


def test_cli_search_then_evaluate_with_exact(world, tmp_path):
    from retrieval.cli import main

    out = str(tmp_path / "cli")
    assert main(["search", "--engine", "local", "--queries", world["queries"], "--index", world["index"],
                 "--output", out, "--set", "search.shortlist=100", "--set", "search.k=10"]) == 0
    truth = tmp_path / "truth.csv"
    src = world["source"]
    lines = ["query_id,gallery_id"] + [
        f"q{i:010d},{synthetic.image_id(int(s)) if s >= 0 else ''}" for i, s in enumerate(src)]
    truth.write_text("\n".join(lines) + "\n")
    assert main(["evaluate", "--engine", "local", "--results", out, "--truth", str(truth),
                 "--exact", world["index"]]) == 0
    m = json.loads(fsio.read_text(f"{out}.eval/metrics.json"))
    assert m["recall@1"] >= 0.95 and m["recall@10"] >= m["recall@1"]
    assert 0 < m["micro_ap"] <= m["recall@10"]   # AP never exceeds the recall finally reached
    assert m["counts"]["matching_queries"] == MATCH and m["counts"]["distractor_queries"] == NOMATCH
    assert m["exact"]["queries"] == MATCH + NOMATCH and m["exact"]["kept_at_k"] > 0.8
    assert m["exact"]["rank1_retained"] >= 0.97
    assert fsio.read_bytes(f"{out}.eval/pr_curve.png")[:4] == b"\x89PNG"
    # a bad truth file is a clear error (exit 2), not a traceback
    bad = tmp_path / "bad.csv"
    bad.write_text("q,g\n")
    assert main(["evaluate", "--engine", "local", "--results", out, "--truth", str(bad)]) == 2


def _background(root, n=400, model_version="synthetic-v1"):
    """Unrelated vectors (another synthetic world) written as a gallery-role feature output."""
    c, f = synthetic.gallery(n, synthetic.SyntheticSpec(n_clusters=50, seed=99))
    url = str(root / f"background-{model_version}")
    synthetic.write_feature_output(url, c, f, num_files=2, storage="int8", model_version=model_version,
                                   id_prefix="bg")
    return url


def test_score_normalisation_keeps_rankings_and_subtracts_the_background_level(world, spark, tmp_path):
    from retrieval.extract.job import read_features
    from retrieval.schema import fine_matrix

    bg_url = _background(tmp_path)
    plain = read_results(search(world["queries"], world["index"], str(tmp_path / "plain"), _cfg())["output"])
    cfg = _cfg(**{"search.normalize.background": bg_url, "search.normalize.k": 7,
                  "search.normalize.beta": 0.8})
    lib = search(world["queries"], world["index"], str(tmp_path / "lib"), cfg, engine=None)
    spk = search(world["queries"], world["index"], str(tmp_path / "spk"), cfg, engine=spark)
    assert lib["params"]["normalize"] == {"background": bg_url, "background_size": 400, "k": 7, "beta": 0.8}
    assert lib["timings"]["normalize_s"] > 0
    a, b = read_results(str(tmp_path / "lib")), read_results(str(tmp_path / "spk"))
    assert a.equals(b)                                        # both engines, same bytes of rows
    keys = ["query_id", "rank", "gallery_id", "score", "coarse_score"]
    assert a.select(keys).equals(plain.select(keys))          # rankings and raw cosines unchanged
    assert a.column("norm_score").null_count == 0
    # norm_score = score - beta x mean of the query's top-7 cosines to the background (brute force)
    qt = read_features(world["queries"])
    q_fine = dict(zip(qt.column("image_id").to_pylist(), fine_matrix(qt)))
    bg = fine_matrix(read_features(bg_url))
    bg /= np.linalg.norm(bg, axis=1, keepdims=True)
    d = a.to_pydict()
    for i in range(0, len(d["query_id"]), 97):
        sims = np.sort(bg @ q_fine[d["query_id"][i]])[::-1][:7]
        assert d["norm_score"][i] == pytest.approx(d["score"][i] - 0.8 * sims.mean(), abs=2e-5)
    _check_false_match_rates(lib, a, q_fine, bg)


def _check_false_match_rates(manifest, rows, q_fine, bg):
    """Every row's fmr / fmr_query (written on both engines: the caller compared them) against a
    brute-force count of unrelated (query, background) pairs scoring at least as high."""
    from retrieval.search.calibrate import NullTail

    cal = manifest["calibration"]
    assert manifest["schema_version"] == 3
    assert (cal["null_queries"], cal["background"], cal["gallery"]) == (MATCH + NOMATCH, 400, N)
    assert cal["pairs"] == (MATCH + NOMATCH) * 400
    d = rows.to_pydict()
    assert rows.column("fmr").null_count == rows.column("fmr_query").null_count == 0
    tail = NullTail.from_manifest(cal)
    norm = np.asarray(d["norm_score"], np.float32)
    np.testing.assert_allclose(d["fmr"], tail.fmr(norm), rtol=1e-9)
    fmr = np.asarray(d["fmr"])
    np.testing.assert_allclose(d["fmr_query"], -np.expm1(N * np.log1p(-fmr)), rtol=1e-9)   # 1 - (1 - fmr)^N
    order = np.argsort(norm)
    assert np.all(np.diff(fmr[order]) <= 0)                 # a higher score is never more likely by chance
    # the null by brute force: every query against every background vector, normalised as the search
    # does, the level from the other 399 background vectors (the pair's own image is an outside one)
    qs = np.stack(list(q_fine.values()))
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    null = []
    for sims in qs @ bg.T:
        others = np.tile(sims, (len(sims), 1))
        np.fill_diagonal(others, -np.inf)
        null.append(sims - 0.8 * np.sort(others, axis=1)[:, -7:].mean(axis=1))
    null = np.sort(np.concatenate(null))
    for rate in (0.5, 0.1, 0.01, 1e-3):                      # the estimate where the null is well observed
        s = null[int(len(null) * (1 - rate))]
        assert float(tail.fmr(s)) == pytest.approx(rate, rel=0.25)
    for i in range(len(norm)):
        seen = len(null) - np.searchsorted(null, norm[i], side="left")     # null pairs scoring >= this row
        if seen >= 50:
            assert fmr[i] == pytest.approx(seen / len(null), rel=0.3)
        elif seen == 0:                                        # above every null pair: extrapolated
            assert fmr[i] < 10 / len(null)


def test_normalisation_background_is_checked_before_anything_is_written(world, tmp_path):
    out = str(tmp_path / "out")
    search(world["queries"], world["index"], out, _cfg())
    before = fsio.read_bytes(f"{out}/_manifest.json")
    other = _background(tmp_path, n=50, model_version="other-model")
    with pytest.raises(ValueError, match="other-model"):      # other settings: overwrite, to get there
        search(world["queries"], world["index"], out, _cfg(**{"search.normalize.background": other}),
               overwrite=True)
    assert fsio.read_bytes(f"{out}/_manifest.json") == before   # the earlier output is intact
    # a sample of the gallery itself: only where the gallery is >= 100x the sample
    with pytest.raises(ValueError, match="at least 100 x"):
        search(world["queries"], world["index"], out, _cfg(**{"search.normalize.background": "gallery",
                                                             "search.normalize.sample": 61}), overwrite=True)
    assert fsio.read_bytes(f"{out}/_manifest.json") == before
    m = search(world["queries"], world["index"], str(tmp_path / "g"),
               _cfg(**{"search.normalize.background": "gallery", "search.normalize.sample": 60}))
    assert m["params"]["normalize"]["background_size"] == 60
    assert read_results(str(tmp_path / "g")).column("norm_score").null_count == 0


def test_normalised_scores_flow_into_evaluate_and_a_calibrated_report_threshold(world, tmp_path):
    from retrieval.cli import main

    bg_url = _background(tmp_path)
    truth = tmp_path / "truth.csv"
    # the copies only (this synthetic world's distractors score like copies: no precision to calibrate)
    truth.write_text("query_id,gallery_id\n" + "".join(
        f"q{i:010d},{synthetic.image_id(int(s))}\n" for i, s in enumerate(world["source"]) if s >= 0))
    raw, norm = str(tmp_path / "raw"), str(tmp_path / "norm")
    common = ["--engine", "local", "--queries", world["queries"], "--index", world["index"],
              "--set", "search.shortlist=100", "--set", "search.k=1"]   # rank 1 only: precision 90% is reached
    assert main(["search", *common, "--output", raw]) == 0
    assert main(["search", *common, "--output", norm, "--set", f"search.normalize.background={bg_url}"]) == 0
    for out in (raw, norm):
        assert main(["evaluate", "--engine", "local", "--results", out, "--truth", str(truth),
                     "--exact", world["index"]]) == 0
    m_raw = json.loads(fsio.read_text(f"{raw}.eval/metrics.json"))
    m_norm = json.loads(fsio.read_text(f"{norm}.eval/metrics.json"))
    assert m_raw["thresholds"]["score"] == "score" and m_norm["thresholds"]["score"] == "norm_score"
    assert m_norm["recall@1"] == m_raw["recall@1"]                # rankings per query are unchanged
    # the threshold at 90% precision really keeps >= 90% precision on the normalised scores
    res = read_results(norm).to_pydict()
    src = {f"q{i:010d}": synthetic.image_id(int(s)) for i, s in enumerate(world["source"]) if s >= 0}
    thr = m_norm["thresholds"]["precision"]["0.9"]
    kept = [(q, g) for q, g, s in zip(res["query_id"], res["gallery_id"], res["norm_score"]) if s >= thr]
    judged = [(q, g) for q, g in kept if q in src]
    assert judged and sum(src[q] == g for q, g in judged) / len(judged) >= 0.9
    assert m_norm["exact"]["metrics"]["micro_ap"] > 0     # the exact search scored on norm_score too
    # the report reads the threshold from the evaluation, on the same score
    rep = str(tmp_path / "report")
    assert main(["report", "--results", norm, "--output", rep, "--set", "report.thumbnails=none",
                 "--set", f"report.threshold={{from_evaluation: {norm}.eval/metrics.json}}"]) == 0
    summary = json.loads(fsio.read_text(f"{rep}/summary.json"))
    assert summary["thresholds"]["flag"] == pytest.approx(thr) and summary["thresholds"]["score"] == "norm_score"
    assert summary["counts"]["flagged_matches"] == len(kept)
    flagged = pq.read_table(f"{rep}/flagged.parquet")
    assert min(flagged.column("norm_score").to_pylist()) >= thr - 1e-6
    # bands and histogram of the normalised scale; the page says which score it flags
    assert summary["thresholds"]["bands"] == [-0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    page = fsio.read_text(f"{rep}/report.html")
    assert "normalised score" in page and "search normalize.background" in page
    # without an evaluation: the threshold where the estimated per-query false-match rate is report.target_fmr
    auto = str(tmp_path / "auto")
    assert main(["report", "--results", norm, "--output", auto, "--set", "report.thumbnails=none",
                 "--set", "report.target_fmr=0.05"]) == 0
    summary = json.loads(fsio.read_text(f"{auto}/summary.json"))
    assert summary["thresholds"]["source"] == "target_fmr" and summary["thresholds"]["target_fmr"] == 0.05
    fq = np.asarray(res["fmr_query"])
    flagged = pq.read_table(f"{auto}/flagged.parquet").column("fmr_query").to_numpy()
    assert summary["counts"]["flagged_matches"] == len(flagged) == int((fq <= 0.05 * (1 + 1e-6)).sum()) > 0
    assert "estimated probability of 0.05" in fsio.read_text(f"{auto}/report.html")
    # thresholds of normalised scores are refused for raw results (another scale), and vice versa
    assert main(["report", "--results", raw, "--output", str(tmp_path / "r2"), "--set", "report.thumbnails=none",
                 "--set", f"report.threshold={{from_evaluation: {norm}.eval}}"]) == 2
    assert not fsio.exists(str(tmp_path / "r2" / "summary.json"))


def test_a_rerun_over_the_old_layout_takes_the_query_features_out_of_the_results(world, tmp_path):
    """Before 0.3 a search of query images encoded them into <results>/query_features, where every
    Parquet reader that recurses read them as result rows; a rerun removes that folder."""
    import shutil

    import pandas as pd

    out = str(tmp_path / "out")
    search(world["queries"], world["index"], out, _cfg(), engine=None)
    shutil.copytree(world["queries"], f"{out}/query_features")      # what 0.2 left there
    search(world["queries"], world["index"], out, _cfg(), engine=None)
    assert not fsio.exists(f"{out}/query_features")
    assert len(pd.read_parquet(out)) == read_results(out).num_rows > 0
