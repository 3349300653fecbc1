"""`retrieval extract --engine local` with the user's own ONNX descriptor model as the backbone."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from retrieval import cli
from retrieval.extract.job import read_features, read_manifest
from retrieval.model.network import build_model
from retrieval.sample import real_photos
from retrieval.schema import coarse_matrix, fine_matrix
from tests.exports import Fine

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("external_job")
    photos = d / "photos"
    photos.mkdir()
    for p in real_photos("train")[:4]:
        shutil.copy(p, photos / os.path.basename(p))
    ref = build_model("mobilenet_v2", "none", head_seed=0)
    path = str(d / "descriptor.onnx")
    torch.onnx.export(Fine(ref).eval(), (torch.rand(2, 3, 224, 224),), path, dynamo=False,
                      input_names=["images"], output_names=["emb"],
                      dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}, "emb": {0: "n"}})
    return str(photos), path, ref


def _sets(path: str, *extra: str) -> list[str]:
    sets = ["model.backbone=onnx", f"model.backbone_weights={path}", "model.checkpoint=null",
            "extract.num_shards=2", "extract.batch_size=2", "extract.threads=1", "extract.storage=float32",
            *extra]
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("role", ["gallery", "query"])
def test_cli_extract_with_an_onnx_backbone(setup, tmp_path, capsys, role):
    photos, path, ref = setup
    out = str(tmp_path / "features")
    assert cli.main(["extract", "--engine", "local", "--input", photos, "--output", out, "--role", role,
                     "--set", "extract.query_regions=[]", *_sets(path)]) == 0     # one row per image
    result = json.loads(capsys.readouterr().out)
    m = read_manifest(out)
    assert m["counts"]["ok"] == 4 and result["model_version"] == m["model_version"]
    t = read_features(out)
    coarse, fine = coarse_matrix(t), fine_matrix(t)
    assert coarse.shape == (4, 128) and fine.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(fine, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(coarse, axis=1), 1.0, atol=1e-5)
    assert set(t["model_version"].to_pylist()) == {m["model_version"]}
    # the fine vectors are the exported model's (= our model's fine descriptor of the same pixels)
    from retrieval.extract.preprocess import prepare

    ids = t["image_id"].to_pylist()
    x = torch.stack([prepare(open(os.path.join(photos, i), "rb").read(), (224,))[0][0] for i in ids])
    with torch.inference_mode():
        want = ref.fine(ref.pooled(x)).numpy()
    assert (np.sum(fine * want, axis=1) > 0.999).all()


def test_cli_extract_refuses_a_bad_model_file_before_any_work(setup, tmp_path, capsys):
    photos, _, _ = setup
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a model")
    out = tmp_path / "features"
    assert cli.main(["extract", "--engine", "local", "--input", photos, "--output", str(out), *_sets(str(bad))]) == 2
    err = capsys.readouterr().err
    assert "model.onnx: not a loadable ONNX model" in err
    assert not out.exists() or not list(out.glob("part-*"))


def test_fit_turns_an_onnx_embedding_model_into_a_dual_descriptor_model(setup, sample, tmp_path, capsys):
    """The interface a user calls: fit with the backbone keys only (model.checkpoint left at its
    default), then later stages with model.checkpoint = exactly the URL given to fit."""
    _, path, _ = setup
    backbone = ["--set", "model.backbone=onnx", "--set", f"model.backbone_weights={path}"]
    model_url = str(tmp_path / "fitted.pt")
    assert cli.main(["fit", "--engine", "local", "--input", sample["gallery"], "--output", model_url,
                     "--set", "fit.adapter2_steps=40", *backbone]) == 0
    card = json.loads(open(model_url + ".card.json").read())
    assert card["base_heads"] == "seed:0" and card["facts"]["heads_initialised"] == "pca"
    assert card["backbone"] == "onnx"
    out = str(tmp_path / "features")
    capsys.readouterr()
    assert cli.main(["extract", "--engine", "local", "--input", sample["gallery"], "--output", out,
                     "--role", "gallery", "--set", f"model.checkpoint={model_url}", *backbone]) == 0
    assert read_manifest(out)["model_version"] == card["model_version"]
    assert coarse_matrix(read_features(out)).shape[1] == 128
    # the checkpoint holds the heads only: without the model file it is refused, clearly
    assert cli.main(["extract", "--engine", "local", "--input", sample["gallery"], "--output",
                     str(tmp_path / "f2"), "--role", "gallery", "--set", f"model.checkpoint={model_url}"]) == 2
    assert "backbone" in capsys.readouterr().err


def test_cli_extract_with_the_onnx_runtime_gives_the_torch_features(setup, tmp_path, capsys):
    """model.runtime=onnx (the shipped default model's trunk exported by `retrieval export`): the
    same rows, the same model_version and descriptors within 1e-4 of the torch extraction."""
    photos, _, _ = setup
    trunk = str(tmp_path / "trunk.onnx")
    assert cli.main(["export", "--format", "onnx", "--output", trunk, "--log-level", "WARNING"]) == 0
    capsys.readouterr()
    outs = {}
    for runtime, extra in (("torch", []), ("onnx", ["--set", "model.runtime=onnx", "--set", f"model.onnx_file={trunk}"])):
        out = str(tmp_path / runtime)
        assert cli.main(["extract", "--engine", "local", "--input", photos, "--output", out, "--role", "query",
                         "--log-level", "WARNING", *extra]) == 0
        outs[runtime] = (read_manifest(out), read_features(out))
    (m_t, f_t), (m_o, f_o) = outs["torch"], outs["onnx"]
    assert m_o["model_version"] == m_t["model_version"] and m_o["counts"]["ok"] == m_t["counts"]["ok"] == 4
    assert f_o.column("image_id").to_pylist() == f_t.column("image_id").to_pylist()
    assert np.abs(coarse_matrix(f_o) - coarse_matrix(f_t)).max() < 1e-4
    assert np.abs(fine_matrix(f_o) - fine_matrix(f_t)).max() < 2e-2      # int8 codes: one step at most
    a, b = fine_matrix(f_o), fine_matrix(f_t)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.9999
