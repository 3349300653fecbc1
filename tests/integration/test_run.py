"""``retrieval run``: the whole pipeline for one's own images in one command, each stage's output
under --output, a rerun that skips what is complete, and a changed setting that reruns only the
stages it changes (local engine here; the demo runs it on Spark)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from retrieval import cli, outputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["--set", "fit.adapter2_steps=20", "--set", "index.quality_queries=50", "--set", "extract.num_shards=2"]


@pytest.fixture(scope="module")
def first_run(sample, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "out")
    args = ["run", "--gallery", sample["gallery"], "--queries", sample["queries"], "--background",
            sample["background"], "--truth", sample["truth"], "--output", out, "--engine", "local", *FAST]
    return out, args


def test_run_writes_every_stage_under_the_output_and_a_report(first_run, sample, capsys):
    out, args = first_run
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == os.path.join(out, "report", "report.html") and os.path.isfile(printed["report"])
    m = outputs.read(out, "run")
    steps = {s["name"]: s for s in m["steps"]}
    assert list(steps) == ["fit", "background_features", "gallery_features", "query_features", "index",
                                "results", "eval", "report"]
    assert not any(s["skipped"] for s in m["steps"])
    for name, stage in [("gallery_features", "extract"), ("query_features", "extract"), ("index", "index"),
                        ("results", "search"), ("eval", "evaluate"), ("report", "report")]:
        assert outputs.read(os.path.join(out, name), stage)
    q = outputs.read(os.path.join(out, "query_features"), "extract")
    assert q["role"] == "query" and q["counts"]["ok"] == sample["n_queries"]
    search = outputs.read(os.path.join(out, "results"), "search")
    assert search["config"]["model"]["checkpoint"] == os.path.join(out, "model", "fitted.pt")
    assert search["config"]["search"]["normalize"]["background"] == os.path.join(out, "background_features")
    assert search["model_version"] == m["model_version"] == q["model_version"]
    # the background images went into the fit's whitening with the gallery (fit.background)
    card = json.load(open(os.path.join(out, "model", "fitted.pt.card.json")))
    assert card["facts"]["background"]["url"] == sample["background"]
    assert card["facts"]["background"]["images_used"] == len(os.listdir(sample["background"]))
    rows = pd.read_parquet(os.path.join(out, "results"))
    assert len(rows) > 0 and rows["query_id"].notna().all() and "norm_score" in rows
    summary = json.load(open(os.path.join(out, "report", "summary.json")))
    assert summary["counts"]["flagged_matches"] > 0
    # the flags came from the evaluation's 90%-precision threshold (truth given)
    assert m["config"]["report"]["threshold"]["precision"] == 0.9
    _verified_by_default(out, rows)


def _verified_by_default(out: str, rows: pd.DataFrame) -> None:
    """search.geometric.top auto: ``retrieval run`` verified each query's top rows (OpenCV is installed
    here): inliers filled on the rows the rule checks, none below, true copies with many."""
    from retrieval.search.geometric import RUN_TOP, Geometric

    g = outputs.read(os.path.join(out, "results"), "search")["params"]["geometric"]
    assert g is not None and g["top"] == RUN_TOP == 10 and g["gate"] == Geometric().gate
    verified = rows.groupby("query_id")["inliers"].count()       # re-ordered after: ranks move, counts do not
    assert 0 < verified.max() <= RUN_TOP and verified.sum() == outputs.read(
        os.path.join(out, "results"), "search")["counts"]["geometric_rows"]
    assert (rows["inliers"] >= 40).sum() >= 5 and rows["geometric_error"].isna().all()
    flagged = pd.read_csv(os.path.join(out, "report", "flagged.csv"))
    assert "inliers" in flagged and flagged["inliers"].notna().any()
    assert " inliers</span>" in open(os.path.join(out, "report", "report.html")).read()   # on the match cards


def test_no_verify_turns_it_off_and_a_configured_top_wins(sample, tmp_path):
    base = ["run", "--gallery", sample["gallery"], "--queries", sample["queries"], "--background",
            sample["background"], "--engine", "local", "--no-fit", *FAST]
    off, three = str(tmp_path / "off"), str(tmp_path / "three")
    assert cli.main(base + ["--output", off, "--no-verify"]) == 0
    assert outputs.read(os.path.join(off, "results"), "search")["params"]["geometric"] is None
    assert pd.read_parquet(os.path.join(off, "results"))["inliers"].isna().all()
    assert cli.main(base + ["--output", three, "--set", "search.geometric.top=3"]) == 0
    assert outputs.read(os.path.join(three, "results"), "search")["params"]["geometric"]["top"] == 3
    rows = pd.read_parquet(os.path.join(three, "results"))
    assert 0 < rows.groupby("query_id")["inliers"].count().max() <= 3


def test_without_opencv_run_warns_once_and_goes_on_unverified(sample, tmp_path):
    """OpenCV blocked in a fresh interpreter (``sys.modules['cv2'] = None``): one warning, the run
    completes, no row verified."""
    out = str(tmp_path / "out")
    code = ("import sys; sys.modules['cv2'] = None\nfrom retrieval import cli\nsys.exit(cli.main(sys.argv[1:]))")
    args = ["run", "--gallery", sample["gallery"], "--queries", sample["queries"], "--background",
            sample["background"], "--output", out, "--engine", "local", "--no-fit", *FAST]
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stderr[-3000:]
    warned = [line for line in p.stderr.splitlines() if "geometric verification" in line]
    assert len(warned) == 1 and "OpenCV is not installed" in warned[0] and "retrieval[verify]" in warned[0], warned
    assert outputs.read(os.path.join(out, "results"), "search")["params"]["geometric"] is None
    assert pd.read_parquet(os.path.join(out, "results"))["inliers"].isna().all()


def test_a_rerun_skips_complete_stages_and_a_changed_setting_reruns_only_its_stage(first_run, capsys):
    out, args = first_run
    assert cli.main(args) == 0
    m = outputs.read(out, "run")
    assert {s["name"] for s in m["steps"] if not s["skipped"]} == {
        "background_features", "gallery_features", "query_features"}   # incremental: nothing recomputed
    for name in ("gallery_features", "query_features", "background_features"):
        assert outputs.read(os.path.join(out, name), "extract")["counts"]["shards_run"] == 0
    capsys.readouterr()
    assert cli.main(args + ["--set", "report.top_queries=3"]) == 0
    m = outputs.read(out, "run")
    assert [s["name"] for s in m["steps"] if not s["skipped"] and s["stage"] != "extract"] == ["report"]
    assert outputs.read(os.path.join(out, "report"), "report")["config"]["report"]["top_queries"] == 3


def test_a_gallery_too_small_to_fit_runs_with_the_configured_model(sample, tmp_path, caplog):
    """Fewer than fit's 20 readable images: the run goes on without fit, says so, and records it."""
    import logging
    import shutil

    gallery = tmp_path / "small"
    gallery.mkdir()
    for name in sorted(os.listdir(sample["gallery"]))[:5]:
        shutil.copy(os.path.join(sample["gallery"], name), gallery / name)
    out = str(tmp_path / "out")
    caplog.set_level(logging.WARNING, logger="retrieval.recipes.run")
    assert cli.main(["run", "--gallery", str(gallery), "--queries", sample["queries"], "--background",
                     sample["background"], "--output", out, "--engine", "local", *FAST]) == 0
    fit = next(s for s in outputs.read(out, "run")["steps"] if s["name"] == "fit")
    assert fit["skipped"] and "at least 20" in fit["reason"] and fit["output"] is None
    assert any("using the configured model as it is" in r.getMessage() for r in caplog.records)
    features = outputs.read(os.path.join(out, "gallery_features"), "extract")
    assert features["counts"]["ok"] == 5 and features["config"]["model"]["checkpoint"] != os.path.join(
        out, "model", "fitted.pt")
    assert os.path.isfile(os.path.join(out, "report", "report.html"))


def test_on_spark_every_stage_runs_in_the_one_session(sample, spark, tmp_path):
    """Session reuse: ``retrieval run`` on Spark starts no session of its own per stage; every stage that
    ran records the application id of the one session it was given, which is still up afterwards."""
    from retrieval import config
    from retrieval.recipes.run import run_all

    out = str(tmp_path / "out")
    cfg = config.load(sets=[s for s in FAST[1::2]])
    m = run_all(sample["gallery"], sample["queries"], out, cfg, spark, background=sample["background"], fit=False)
    app = spark.sparkContext.applicationId
    ran = [s for s in m["steps"] if not s["skipped"]]
    assert {s["name"] for s in ran} >= {"gallery_features", "query_features", "index", "results"}
    for s in ran:
        if s["stage"] in ("extract", "index", "search"):
            assert outputs.find(s["output"], s["stage"])["engine_session"] == app, s["name"]
    assert m["engine_session"] == app
    assert spark.sparkContext.parallelize(range(3), 1).sum() == 3      # not stopped by any stage
    rows = pd.read_parquet(os.path.join(out, "results"))         # verified by default on Spark too
    assert 0 < rows.groupby("query_id")["inliers"].count().max() <= 10 and (rows["inliers"] >= 40).any()
    assert outputs.read(os.path.join(out, "results"), "search")["params"]["geometric"]["top"] == 10


def test_on_spark_without_opencv_run_goes_on_unverified(sample, spark, tmp_path, monkeypatch, caplog):
    import logging

    from retrieval import config
    from retrieval.recipes.run import run_all

    monkeypatch.setitem(sys.modules, "cv2", None)                   # OpenCV not importable on the driver
    caplog.set_level(logging.WARNING, logger="retrieval.search.geometric")
    out = str(tmp_path / "out")
    m = run_all(sample["gallery"], sample["queries"], out, config.load(sets=[s for s in FAST[1::2]]), spark,
                background=sample["background"], fit=False)
    assert [r.getMessage() for r in caplog.records if "OpenCV is not installed" in r.getMessage()] != []
    assert len([r for r in caplog.records if "geometric verification" in r.getMessage()]) == 1
    assert outputs.read(m["results"], "search")["params"]["geometric"] is None
    assert pd.read_parquet(m["results"])["inliers"].isna().all()


def test_on_spark_no_verify_turns_it_off_and_a_configured_top_wins(sample, spark, tmp_path):
    from retrieval import config
    from retrieval.recipes.run import run_all

    out = str(tmp_path / "out")
    sets = [s for s in FAST[1::2]]
    m = run_all(sample["gallery"], sample["queries"], out, config.load(sets=sets), spark,
                background=sample["background"], fit=False, verify=False)
    assert outputs.read(m["results"], "search")["params"]["geometric"] is None
    assert pd.read_parquet(m["results"])["inliers"].isna().all()
    m = run_all(sample["gallery"], sample["queries"], out, config.load(sets=sets + ["search.geometric.top=3"]), spark,
                background=sample["background"], fit=False)                   # a configured number wins over auto
    steps = {s["name"]: s for s in m["steps"]}
    assert not steps["results"]["skipped"] and steps["index"]["skipped"]      # only the search (and after) reran
    assert outputs.read(m["results"], "search")["params"]["geometric"]["top"] == 3
    assert 0 < pd.read_parquet(m["results"]).groupby("query_id")["inliers"].count().max() <= 3
