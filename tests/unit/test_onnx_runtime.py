"""model.runtime=onnx: the built-in trunk (backbone + GeM) exported by `retrieval export --format onnx`
and run by onnxruntime gives the torch model's descriptors under the same model_version; files made
from other weights, altered (e.g. quantised) files and missing files are refused."""
from __future__ import annotations

import json

import pytest
import torch

from retrieval import config
from retrieval.model.checkpoints import model_from_config
from retrieval.model.network import ModelError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the bundled ImageNet weights + seeded heads (a random trunk pools to all-eps: it would prove nothing)
SMALL = ["model.checkpoint=null", "preprocess.size_hi=96", "preprocess.size_lo=64"]


def _model(*sets: str):
    cfg = config.load(sets=[*SMALL, *sets])
    return model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from retrieval.model.onnx_runtime import export_onnx

    path = str(tmp_path_factory.mktemp("onnx") / "trunk.onnx")
    model = _model()
    return model, path, export_onnx(model, path)


def test_export_then_runtime_onnx_gives_the_same_descriptors(exported):
    ref, path, info = exported
    assert info["model_version"] == ref.model_version() and info["max_abs_diff"] <= 1e-4
    m = _model("model.runtime=onnx", f"model.onnx_file={path}")
    assert m.model_version() == ref.model_version()          # same model: features mix with torch ones
    calls = []
    trunk = m._onnx_trunk
    object.__setattr__(m, "_onnx_trunk", lambda x: calls.append(len(x)) or trunk(x))
    x_hi = torch.rand(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    assert ref.pooled(x_hi).std() > 0.01   # a trunk whose output depends on the image
    x_lo = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for a, b in zip(m.encode_query(x_lo, x_hi), ref.encode_query(x_lo, x_hi)):
            assert (a - b).abs().max() < 1e-4
        for a, b in zip(m.encode_gallery(x_hi), ref.encode_gallery(x_hi)):
            assert (a - b).abs().max() < 1e-4
    assert calls == [3, 3, 3]
    with torch.enable_grad():   # training (autograd) runs the torch trunk
        assert m.pooled(x_hi).requires_grad


def test_refuses_a_file_of_other_weights_an_altered_file_and_no_file(exported, tmp_path):
    import onnx
    from onnx import numpy_helper

    _, path, _ = exported
    with pytest.raises(ModelError, match="exported from model_version"):
        _model("model.head_seed=1", "model.runtime=onnx", f"model.onnx_file={path}")
    proto = onnx.load(path)            # same metadata, altered weights (as a quantised file would be)
    init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.05, init.name))
    altered = str(tmp_path / "altered.onnx")
    onnx.save(proto, altered)
    with pytest.raises(ModelError, match="away from the torch model"):
        _model("model.runtime=onnx", f"model.onnx_file={altered}")
    with pytest.raises(ModelError, match="needs model.onnx_file"):
        _model("model.runtime=onnx")
    with pytest.raises(config.ConfigError, match="model.runtime"):
        config.load(sets=["model.runtime=tensorrt"])


def test_cli_export(tmp_path, capsys):
    from retrieval.cli import main

    out = str(tmp_path / "m.onnx")
    assert main(["export", "--format", "onnx", "--output", out, "--log-level", "WARNING",
                 *[x for s in SMALL for x in ("--set", s)]]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["output"] == out and info["model_version"] == _model().model_version()
    assert info["use"] == f"--set model.runtime=onnx --set model.onnx_file={out}"
