"""Extraction job end to end on real files: local path and Spark local[2], all input kinds."""
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval import config, fsio
from retrieval.extract.job import extract, read_features, read_manifest
from retrieval.extract.inputs import InputError
from retrieval.schema import coarse_matrix, fine_matrix
from tests.imagezoo import EXPECTED, make_zoo

N_ZOO = len(EXPECTED)
N_OK = sum(1 for v in EXPECTED.values() if v == "ok")


def cfg(**sets):
    items = [f"{k}={v}" for k, v in {"extract.num_shards": 3, "extract.batch_size": 4,
                                      "extract.storage": "float32",
                                      "extract.progress_seconds": 0.5, **sets}.items()]
    return config.load(sets=items)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo_in")
    make_zoo(str(d))
    return str(d)


@pytest.fixture(scope="module")
def local_out(zoo_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out") / "local")
    extract(zoo_dir, out, cfg())
    return out


def errors_of(out):
    return pa.concat_tables([pq.read_table(p) for p in sorted(
        fsio.url_to_fs(out)[0].glob(out + "/errors/*.parquet"))])


def test_local_counts_schema_and_error_reasons(local_out):
    m = read_manifest(local_out)
    assert m["counts"]["inputs"] == N_ZOO and m["counts"]["ok"] == N_OK
    assert m["counts"]["ok"] + m["counts"]["errors"] == N_ZOO
    t = read_features(local_out)
    ids = t["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == N_OK
    assert set(ids) == {k for k, v in EXPECTED.items() if v == "ok"}
    assert "sub/dir/nested.jpg" in ids and "<script>alert(1)<'script>.jpg" in ids
    assert t.schema.field("coarse").type == pa.list_(pa.float32(), 128)
    assert t.schema.field("fine").type == pa.list_(pa.float32(), 512)
    assert set(t["role"].to_pylist()) == {"gallery"}
    assert set(t["model_version"].to_pylist()) == {m["model_version"]}
    np.testing.assert_allclose(np.linalg.norm(coarse_matrix(t), axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(fine_matrix(t), axis=1), 1.0, atol=1e-5)
    errs = {r["image_id"]: r["error"] for r in errors_of(local_out).to_pylist()}
    for name, want in EXPECTED.items():
        if want != "ok":
            assert want in errs[name], (name, errs[name])
    assert m["config"]["extract"]["num_shards"] == 3 and "timings" in m
    for s in m["shards"]:   # every file is recorded with its checksum
        assert fsio.sha256_file(fsio.join(local_out, s["file"])) == s["sha256"]


def test_spark_equals_local_and_rerun_is_idempotent(spark, zoo_dir, local_out, tmp_path):
    out = str(tmp_path / "spark")
    m = extract(zoo_dir, out, cfg(), spark)
    assert m["engine"] == "spark" and m["counts"] == read_manifest(local_out)["counts"]
    a, b = read_features(local_out), read_features(out)
    assert a["image_id"].to_pylist() == b["image_id"].to_pylist()
    assert np.abs(fine_matrix(a) - fine_matrix(b)).max() < 1e-4
    assert np.abs(coarse_matrix(a) - coarse_matrix(b)).max() < 1e-4
    before = {s["file"]: s["sha256"] for s in m["shards"]}
    again = extract(zoo_dir, out, cfg(), spark)     # incremental: nothing to do
    assert again["counts"]["shards_skipped"] == again["counts"]["shards"] and again["counts"]["shards_run"] == 0
    assert {s["file"]: s["sha256"] for s in again["shards"]} == before
    assert read_features(out).num_rows == N_OK
    redo = extract(zoo_dir, out, cfg(**{"extract.mode": "overwrite"}), spark)
    assert redo["counts"]["shards_run"] == redo["counts"]["shards"]
    assert {s["file"]: s["sha256"] for s in redo["shards"]} == before   # same bytes


def test_resume_after_a_shard_died(zoo_dir, tmp_path):
    out = str(tmp_path / "resume")
    first = extract(zoo_dir, out, cfg())
    victim = first["shards"][1]
    # simulate a task killed midway: marker and shard never committed, a temp file left behind
    os.remove(os.path.join(out, "_shards", victim["file"].replace(".parquet", ".json")))
    os.remove(os.path.join(out, victim["file"]))
    open(os.path.join(out, ".tmp-dead-" + victim["file"]), "wb").write(b"partial")
    os.remove(os.path.join(out, "_manifest.json"))
    with pytest.raises(FileNotFoundError, match="not a \\(complete\\) feature output"):
        read_features(out)
    second = extract(zoo_dir, out, cfg())
    assert second["counts"]["shards_run"] == 1 and second["counts"]["shards_skipped"] == 2
    assert {s["file"]: s["sha256"] for s in second["shards"]} == {s["file"]: s["sha256"] for s in first["shards"]}
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_changed_input_recomputes_only_touched_shards(zoo_dir, tmp_path):
    src = tmp_path / "grow"
    shutil.copytree(zoo_dir, src)
    out = str(tmp_path / "grow_out")
    extract(str(src), out, cfg())
    shutil.copy(src / "photo.bmp", src / "added.bmp")
    m = extract(str(src), out, cfg())
    assert m["counts"]["shards_run"] == 1 and m["counts"]["ok"] == N_OK + 1


def test_query_role_is_asymmetric(zoo_dir, local_out, tmp_path):
    out = str(tmp_path / "query")
    extract(zoo_dir, out, cfg(**{"extract.role": "query", "extract.query_regions": []}))   # whole images only
    q, g = read_features(out), read_features(local_out)
    assert set(q["role"].to_pylist()) == {"query"}
    assert np.abs(fine_matrix(q) - fine_matrix(g)).max() < 1e-5      # same R_hi fine path
    cos = (coarse_matrix(q) * coarse_matrix(g)).sum(1)                # R_lo + adapter 2 vs R_hi + adapter 1
    assert cos.max() < 0.99999 and cos.mean() > 0.8


def test_manifest_and_parquet_bytes_inputs(zoo_dir, tmp_path):
    rows = [("a", os.path.join(zoo_dir, "photo.bmp")), ("b", "photo.webp"),   # relative to the manifest
            ("missing", os.path.join(zoo_dir, "nope.jpg")), ("bad_uri", "nosuchproto://x/y.jpg"),
            ("a", os.path.join(zoo_dir, "gray.jpg"))]                          # duplicate id
    man = tmp_path / "m.csv"
    man.write_text("image_id,uri\n" + "".join(f"{i},{u}\n" for i, u in rows))
    shutil.copy(os.path.join(zoo_dir, "photo.webp"), tmp_path / "photo.webp")
    m = extract(str(man), str(tmp_path / "mout"), cfg())
    assert m["counts"] == {**m["counts"], "inputs": 5, "ok": 2, "errors": 3}
    errs = {(r["image_id"], r["error"].split(":")[0]) for r in errors_of(str(tmp_path / "mout")).to_pylist()}
    assert ("missing", "missing file") in errs and ("bad_uri", "unreadable uri") in errs
    assert ("a", "duplicate image_id (the first occurrence is processed)") in errs
    # img2dataset-style parquet with bytes, split over two files
    names = ["photo.bmp", "gray.jpg", "corrupt.jpg", "cmyk.jpg"]
    blobs = [open(os.path.join(zoo_dir, n), "rb").read() for n in names]
    pdir = tmp_path / "pq"
    pdir.mkdir()
    pq.write_table(pa.table({"key": names[:2], "jpg": blobs[:2]}), pdir / "00000.parquet")
    pq.write_table(pa.table({"key": names[2:], "jpg": blobs[2:]}), pdir / "00001.parquet")
    m = extract(str(pdir), str(tmp_path / "pout"), cfg(**{"extract.storage": "int8"}))
    assert (m["counts"]["ok"], m["counts"]["errors"]) == (3, 1)
    t = read_features(str(tmp_path / "pout"))
    assert t.schema.field("fine").type == pa.binary(512) and "fine_scale" in t.column_names
    np.testing.assert_allclose(np.linalg.norm(fine_matrix(t), axis=1), 1.0, atol=5e-3)
    assert sorted(t["image_id"].to_pylist()) == sorted(["photo.bmp", "gray.jpg", "cmyk.jpg"])
    assert all("#row=" in u for u in t["uri"].to_pylist())


def test_clear_errors_before_any_work(zoo_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no images"):
        extract(str(empty), str(tmp_path / "o1"), cfg())
    with pytest.raises(InputError, match="input not found"):
        extract(str(tmp_path / "nothing"), str(tmp_path / "o2"), cfg())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        extract(zoo_dir, str(blocker / "out"), cfg())
    with pytest.raises(config.ConfigError):
        cfg(**{"extract.batch_size": -1})
    assert not (tmp_path / "o1").exists() or not list((tmp_path / "o1").glob("part-*"))


@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_task_failure_mid_shard_is_retried_to_an_identical_output(spark, zoo_dir, local_out, tmp_path, kind,
                                                                   monkeypatch):
    out = str(tmp_path / f"fault_{kind}")
    monkeypatch.setenv("RETRIEVAL_FAULTS", f"stage=extract,task=1,kind={kind},after_items=4")
    m = extract(zoo_dir, out, cfg(), spark)
    ref = read_manifest(local_out)
    assert [s["attempt"] for s in m["shards"]] == [0, 1, 0]   # shard 1 failed once and was retried
    assert m["counts"]["ok"] == ref["counts"]["ok"] and m["counts"]["errors"] == ref["counts"]["errors"]
    a, b = read_features(local_out), read_features(out)
    assert a["image_id"].to_pylist() == b["image_id"].to_pylist()     # no duplicate, no missing row
    assert np.abs(fine_matrix(a) - fine_matrix(b)).max() < 1e-4
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def _build_in_task(cfgs: tuple, _item: int) -> tuple[int, int]:
    """In a Spark task: the freeze count of the collector before and after the model is there."""
    import gc

    from retrieval.model.task import get_model

    before = gc.get_freeze_count()
    get_model(cfgs[0], cfgs[1], "cpu")
    return before, gc.get_freeze_count()


def test_a_task_freezes_its_model_out_of_the_collectors_scans(spark):
    """PySpark's reused workers run gc.collect() after every task (0.18 s over torch, onnxruntime and a
    model): a task that built the model has frozen it and the modules (gc.freeze); the driver does not."""
    import functools
    import gc

    from retrieval.engine import SparkEngine
    from retrieval.model.task import get_model

    c = config.load(sets=["model.runtime=torch", "preprocess.decoder=pillow"])
    cfgs = (c["model"].to_dict(), c["preprocess"].to_dict())
    got = SparkEngine(spark).map(functools.partial(_build_in_task, cfgs), [0, 1], "t", every=60)
    assert all(after >= 100_000 for _, after in got), got       # torch alone is > 100k objects
    assert any(after > before for before, after in got) or all(before >= 100_000 for before, _ in got)
    before = gc.get_freeze_count()
    get_model(*cfgs, "cpu")
    assert gc.get_freeze_count() == before == 0
