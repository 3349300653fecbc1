"""model.runtime=auto (the default): the extraction job builds the ONNX trunk once on the driver into a
cache, the tasks run it on onnxruntime on the CPU, and the rows are torch's (within the ONNX tolerance)
under the same model_version on both engines; a stale or altered cached file is refused and rebuilt;
without onnxruntime the job runs torch with a warning."""
from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pytest

from retrieval import config, fsio, outputs
from retrieval.extract.job import extract, read_features, read_manifest
from retrieval.model.checkpoints import model_from_config
from retrieval.model.common import ModelError
from retrieval.model.onnx_cache import OUTPUT_CACHE, cache_folders, ensure_trunk, resolve_runtime
from retrieval.schema import coarse_matrix, fine_matrix
from tests.imagezoo import make_zoo

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

# the bundled ImageNet weights + seeded heads at a small size (fast; its cache is <output>/_cache)
SMALL = ["model.checkpoint=null", "preprocess.size_hi=96", "preprocess.size_lo=64"]
TOL = 1e-4


def _cfg(*sets: str):
    return config.load(sets=["extract.num_shards=2", "extract.batch_size=4", "extract.storage=float32",
                             "extract.progress_seconds=0.5", *SMALL, *sets])


def _model(cfg):
    return model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict())


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    make_zoo(str(d))
    return str(d)


@pytest.fixture(scope="module")
def torch_out(zoo, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("torch") / "f")
    extract(zoo, out, _cfg("model.runtime=torch"))
    return out


def _same_rows(a_url: str, b_url: str) -> None:
    a, b = read_features(a_url), read_features(b_url)
    assert a["image_id"].to_pylist() == b["image_id"].to_pylist() and a.num_rows > 5
    assert a["model_version"].to_pylist() == b["model_version"].to_pylist()
    assert np.abs(coarse_matrix(a) - coarse_matrix(b)).max() < TOL
    assert np.abs(fine_matrix(a) - fine_matrix(b)).max() < TOL


@pytest.mark.parametrize("engine", ["local", "spark"])
def test_auto_gives_the_torch_rows_and_model_version(engine, zoo, torch_out, tmp_path, request):
    cfg = _cfg()
    assert cfg["model.runtime"] == "auto"       # the default
    out = str(tmp_path / "auto")
    m = extract(zoo, out, cfg, request.getfixturevalue("spark") if engine == "spark" else None)
    ref = read_manifest(torch_out)
    assert m["model_version"] == ref["model_version"] and m["counts"] == ref["counts"]
    onnx_file = m["runtime"]["onnx_file"]
    assert m["runtime"]["configured"] == "auto" and ref["runtime"]["onnx_file"] is None
    assert onnx_file == fsio.join(out, OUTPUT_CACHE, f"trunk-{m['model_version']}.onnx")
    record = fsio.read_json(onnx_file[:-len(".onnx")] + ".json")
    assert record["sha256"] == fsio.sha256_file(onnx_file) and record["model_version"] == m["model_version"]
    _same_rows(out, torch_out)
    assert {s["runtime"] for s in m["shards"]} == {"onnxruntime"}       # what the tasks ran
    assert {s["runtime"] for s in ref["shards"]} == {"torch"}
    # the output keeps the identity an output of the torch runtime had: one can extend the other
    assert outputs.settings_hash("extract", cfg) == outputs.settings_hash("extract", _cfg("model.runtime=torch"))
    again = extract(zoo, out, cfg, request.getfixturevalue("spark") if engine == "spark" else None)
    assert again["counts"]["shards_run"] == 0 and again["runtime"]["onnx_file"] == onnx_file


def test_the_tasks_run_onnxruntime_and_refuse_a_file_changed_after_the_driver(tmp_path):
    cfg = _cfg()
    model = _model(cfg)
    task_cfg = resolve_runtime(cfg["model"].to_dict(), model, str(tmp_path / "out"))
    m = model_from_config(task_cfg, cfg["preprocess"].to_dict())
    assert m.__dict__.get("_onnx_trunk") is not None and m.model_version() == model.model_version()
    with open(task_cfg["onnx_file"], "ab") as fh:    # altered after the driver checked it
        fh.write(b"\0")
    with pytest.raises(ModelError, match="changed after the driver checked it"):
        model_from_config(task_cfg, cfg["preprocess"].to_dict())


def test_stale_or_altered_cached_file_is_refused_and_rebuilt(tmp_path, caplog):
    cfg = _cfg()
    model = _model(cfg)
    folder = str(tmp_path / "cache")
    first = ensure_trunk(model, [folder])
    url = first["onnx_file"]
    assert ensure_trunk(model, [folder]) == first                   # cached: reused as is
    # altered bytes (truncated): refused (sha256 differs from the record), rebuilt
    data = open(url, "rb").read()
    with open(url, "wb") as fh:
        fh.write(data[:len(data) // 2])
    with caplog.at_level(logging.WARNING, "retrieval.model.onnx_cache"):
        rebuilt = ensure_trunk(model, [folder])
    assert "refused" in caplog.text and rebuilt["onnx_sha256"] == fsio.sha256_file(url)
    assert open(url, "rb").read() == data                            # the export is deterministic
    # stale: another model's trunk under this name, its record rewritten to match: refused by the
    # version the file carries, rebuilt
    other = _model(_cfg("model.head_seed=1"))
    assert other.model_version() != model.model_version()
    stale = ensure_trunk(other, [str(tmp_path / "other")])
    os.replace(stale["onnx_file"], url)
    record = fsio.read_json(url[:-5] + ".json")
    fsio.write_json(url[:-5] + ".json", {**record, "sha256": fsio.sha256_file(url)})
    caplog.clear()
    with caplog.at_level(logging.WARNING, "retrieval.model.onnx_cache"):
        again = ensure_trunk(model, [folder])
    assert "exported from model_version" in caplog.text
    assert again["onnx_sha256"] == first["onnx_sha256"] == fsio.sha256_file(url)


def test_cache_beside_the_model_else_the_output(tmp_path):
    ckpt = str(tmp_path / "model" / "m.npz")
    os.makedirs(os.path.dirname(ckpt))
    cfg = config.load(sets=[f"model.checkpoint={ckpt}"])
    out = str(tmp_path / "out")
    assert cache_folders(cfg["model"].to_dict(), out) == [str(tmp_path / "model" / ".onnx-cache"),
                                                          fsio.join(out, OUTPUT_CACHE)]
    # a cluster (tasks on other machines, each with its own install of the model): the output's cache
    assert cache_folders(cfg["model"].to_dict(), out, beside_model=False) == [fsio.join(out, OUTPUT_CACHE)]
    assert cache_folders(_cfg()["model"].to_dict(), out) == [fsio.join(out, OUTPUT_CACHE)]
    assert cache_folders(_cfg("model.onnx_cache=/some/where")["model"].to_dict(), out) == ["/some/where"]
    blocked = tmp_path / "a_file"           # a folder that cannot be made: the next one is used
    blocked.write_text("x")
    built = ensure_trunk(_model(_cfg()), [str(blocked / "cache"), str(tmp_path / "next")])
    assert built["onnx_file"].startswith(str(tmp_path / "next"))


def test_without_onnxruntime_auto_runs_torch_with_a_warning(zoo, torch_out, tmp_path, monkeypatch, caplog):
    cfg = _cfg()
    task_cfg = resolve_runtime(cfg["model"].to_dict(), _model(cfg), str(tmp_path / "o"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)      # as if it were not installed
    with caplog.at_level(logging.WARNING):
        m = model_from_config(task_cfg, cfg["preprocess"].to_dict())     # a task without it
        assert m.__dict__.get("_onnx_trunk") is None
        out = str(tmp_path / "fallback")
        manifest = extract(zoo, out, cfg)
    assert "onnxruntime is not installed" in caplog.text and "runs on torch" in caplog.text
    assert manifest["runtime"]["onnx_file"] is None and {s["runtime"] for s in manifest["shards"]} == {"torch"}
    _same_rows(out, torch_out)


def test_precision_enters_the_identity_only_away_from_fp32():
    base = outputs.settings_hash("extract", _cfg())
    assert outputs.settings_hash("extract", _cfg("model.precision=fp32")) == base
    assert outputs.settings_hash("extract", _cfg("model.precision=bf16")) != base
    with pytest.raises(config.ConfigError, match="model.precision"):
        _cfg("model.precision=int4")


def test_int8_codes_move_by_at_most_one_step(zoo, tmp_path):
    from retrieval.schema import column_matrix

    tables = {}
    for runtime in ("auto", "torch"):
        out = str(tmp_path / runtime)
        extract(zoo, out, _cfg(f"model.runtime={runtime}", "extract.storage=int8"))
        tables[runtime] = read_features(out)
    a, b = tables["auto"], tables["torch"]
    assert a["image_id"].to_pylist() == b["image_id"].to_pylist()
    codes_a = column_matrix(a.column("fine")).astype(np.int16)
    codes_b = column_matrix(b.column("fine")).astype(np.int16)
    assert np.abs(codes_a - codes_b).max() <= 1
    np.testing.assert_allclose(a["fine_scale"].to_numpy(), b["fine_scale"].to_numpy(), rtol=1e-3)


def test_a_gpu_task_runs_torch_under_auto_and_onnx_when_asked():
    from retrieval.model.task import device_model_cfg

    cfg = {"runtime": "auto", "onnx_file": "/c/trunk.onnx", "onnx_sha256": "ab"}
    assert device_model_cfg(cfg, "cpu") == cfg
    assert device_model_cfg(cfg, "cuda:1")["onnx_file"] is None
    explicit = {"runtime": "onnx", "onnx_file": "/c/trunk.onnx"}
    assert device_model_cfg(explicit, "cuda:0") == explicit
