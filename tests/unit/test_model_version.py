"""The configured model's ``model_version`` from its metadata (retrieval.model.version): the same as the
built model's, for the shipped default model, seeded heads on the bundled and on a resnet weights file,
a delta, a full checkpoint, the user's TorchScript / ONNX files (and a checkpoint made on one), and
``model.runtime: onnx``; computed without building the network (no torch module is constructed)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from retrieval import config
from retrieval.model.checkpoints import model_from_config, save_checkpoint
from retrieval.model.network import ModelError, build_model
from retrieval.model.version import configured_model_version

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HI, LO = 96, 64
SMALL = {"size_hi": HI, "size_lo": LO, "resize": "squash"}


def _cfg(**model) -> dict:
    return {**config.load()["model"].to_dict(), **model}


def _no_network(monkeypatch) -> list[str]:
    """From now on, constructing any torch module (the descriptor network, a torchvision backbone, an
    external backbone, a loaded TorchScript module) raises."""
    built: list[str] = []

    def refuse(self, *args, **kwargs):
        built.append(type(self).__name__)
        raise AssertionError(f"a torch module was constructed: {type(self).__name__}")

    monkeypatch.setattr(nn.Module, "__init__", refuse)
    return built


def _both(model_cfg: dict, pre: dict, monkeypatch) -> tuple[str, str]:
    """(the built model's version, the metadata's version with no network allowed)."""
    built = model_from_config(model_cfg, pre).model_version()
    with monkeypatch.context() as m:
        _no_network(m)
        meta = configured_model_version(model_cfg, pre)
    return built, meta


def test_the_shipped_default_model(monkeypatch):
    cfg = config.load()
    built, meta = _both(cfg["model"].to_dict(), cfg["preprocess"].to_dict(), monkeypatch)
    assert meta == built == "709f1b048ba3dac7"     # the default model of issue 12


def test_the_search_driver_learns_it_without_building_the_network(monkeypatch):
    from retrieval.search.queries import config_model_version

    built = _no_network(monkeypatch)
    assert config_model_version(config.load()) == "709f1b048ba3dac7"
    assert built == []


@pytest.mark.parametrize("seed,gem_p,dims", [(0, 3.0, (512, 128)), (3, 2.5, (256, 64))])
def test_seeded_heads_on_the_bundled_weights(monkeypatch, seed, gem_p, dims):
    cfg = _cfg(checkpoint=None, head_seed=seed, gem_p=gem_p, fine_dim=dims[0], coarse_dim=dims[1])
    built, meta = _both(cfg, SMALL, monkeypatch)
    assert meta == built
    other = configured_model_version({**cfg, "head_seed": seed + 1}, SMALL)
    assert other != meta and configured_model_version(cfg, {**SMALL, "size_hi": 128}) != meta


def test_seeded_heads_on_a_resnet_weights_file(tmp_path, monkeypatch):
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    cfg = _cfg(checkpoint=None, backbone="resnet18", backbone_weights=str(tmp_path / "r18.pth"))
    built, meta = _both(cfg, SMALL, monkeypatch)
    assert meta == built
    with pytest.raises(ModelError, match="does not fit resnet50"):
        configured_model_version({**cfg, "backbone": "resnet50"}, SMALL)


def test_random_backbone_weights_are_built_for_their_version():
    """backbone_weights=none draws the trunk from torch's global generator: no identity apart from the
    network, so that one case builds it (the same draw gives the same version)."""
    cfg = _cfg(checkpoint=None, backbone_weights="none")
    torch.manual_seed(5)
    built = model_from_config(cfg, SMALL).model_version()
    torch.manual_seed(5)
    assert configured_model_version(cfg, SMALL) == built
    torch.manual_seed(6)
    assert configured_model_version(cfg, SMALL) != built


def test_trunk_tensor_counts_match_torchvision():
    import torchvision

    from retrieval.model.network import TRUNK_TENSORS, build_backbone

    for name in TRUNK_TENSORS:
        trunk, _ = build_backbone(name, "none")
        assert len(trunk.state_dict()) == TRUNK_TENSORS[name], name
        full = getattr(torchvision.models, name)(weights=None).state_dict()
        assert len(full) > TRUNK_TENSORS[name]


def test_a_delta_and_a_full_checkpoint(tmp_path, monkeypatch):
    from retrieval.model.delta import export_delta

    model = build_model(size_hi=HI, size_lo=LO, head_seed=2)
    with torch.no_grad():
        model.fine_head.weight.mul_(1.5)
        model.pool.p.fill_(2.75)
    model.enable_whitening()
    delta = str(tmp_path / "d.npz")
    export_delta(model, delta, head_seed=2)
    built, meta = _both(_cfg(checkpoint=delta), SMALL, monkeypatch)
    assert meta == built
    full = str(tmp_path / "m.pt")
    saved = save_checkpoint(model, full)["model_version"]
    built, meta = _both(_cfg(checkpoint=full), SMALL, monkeypatch)
    assert meta == built == saved
    for missing in (str(tmp_path / "missing.pt"), str(tmp_path / "missing.npz")):
        with pytest.raises(ModelError, match="not found"):
            configured_model_version(_cfg(checkpoint=missing), SMALL)


# ---------------------------------------------------------------------------------------------
# the user's own model file
class _Embed(nn.Module):
    """A small embedding model: float N x 3 x H x W -> N x K (or uint8 N x H x W x 3)."""

    def __init__(self, k: int, uint8: bool = False):
        super().__init__()
        self.uint8 = uint8
        self.conv = nn.Conv2d(3, 16, 3, stride=2)
        self.fc = nn.Linear(16, k)

    def forward(self, x):
        if self.uint8:
            x = x.permute(0, 3, 1, 2).float() / 255.0
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    x = torch.rand(2, 3, HI, HI)
    u8 = (x * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    files = {"ts": str(d / "e.torchscript.pt"), "onnx": str(d / "e.onnx"), "u8": str(d / "u8.onnx"),
             "ts512": str(d / "e512.torchscript.pt")}
    torch.jit.trace(_Embed(64).eval(), x).save(files["ts"])
    torch.jit.trace(_Embed(512).eval(), x).save(files["ts512"])
    for key, net, inp, axes in (("onnx", _Embed(64), x, {0: "n", 2: "h", 3: "w"}),
                                ("u8", _Embed(512, uint8=True), u8, {0: "n", 1: "h", 2: "w"})):
        pytest.importorskip("onnx")
        torch.onnx.export(net.eval(), (inp,), files[key], dynamo=False, input_names=["images"],
                          output_names=["emb"], dynamic_axes={"images": axes, "emb": {0: "n"}})
    return files


@pytest.mark.parametrize("kind,key", [("onnx", "onnx"), ("onnx", "u8")])
def test_seeded_heads_on_an_onnx_file_read_from_its_signature(model_files, monkeypatch, kind, key):
    pytest.importorskip("onnxruntime")
    cfg = _cfg(checkpoint=None, backbone=kind, backbone_weights=model_files[key])
    built, meta = _both(cfg, SMALL, monkeypatch)    # no torch module: not even the external backbone
    assert meta == built


@pytest.mark.parametrize("key", ["ts", "ts512"])
def test_seeded_heads_on_a_torchscript_file(model_files, monkeypatch, key):
    """TorchScript declares no output width: the file itself runs once (its test forward), but neither
    the descriptor network nor a torchvision backbone is built."""
    import retrieval.model.network as network

    cfg = _cfg(checkpoint=None, backbone="torchscript", backbone_weights=model_files[key])
    built = model_from_config(cfg, SMALL).model_version()
    with monkeypatch.context() as m:
        for name in ("build_model", "build_backbone"):
            m.setattr(network, name, lambda *a, **k: pytest.fail("the network was built"))
        m.setattr(network.DescriptorModel, "__init__", lambda *a, **k: pytest.fail("the network was built"))
        assert configured_model_version(cfg, SMALL) == built


def test_a_checkpoint_on_an_onnx_file(model_files, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    model = build_model("onnx", model_files["u8"], size_hi=HI, size_lo=LO, head_seed=1)
    url = str(tmp_path / "ext.pt")
    save_checkpoint(model, url)
    cfg = _cfg(checkpoint=url, backbone="onnx", backbone_weights=model_files["u8"])
    built, meta = _both(cfg, SMALL, monkeypatch)
    assert meta == built == model.model_version()
    with pytest.raises(ModelError, match="was made with backbone file sha256"):   # as loading says
        configured_model_version({**cfg, "backbone_weights": model_files["onnx"]}, SMALL)
    with pytest.raises(ModelError, match="set model.backbone_weights to that file"):
        configured_model_version({**cfg, "backbone": "mobilenet_v2", "backbone_weights": "default"}, SMALL)
    with pytest.raises(ModelError, match="a .npz delta is a mobilenet_v2 model"):
        configured_model_version({**cfg, "checkpoint": "d.npz"}, SMALL)


def test_runtime_onnx_keeps_the_version_and_checks_the_file(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from retrieval.model.onnx_runtime import export_onnx

    cfg = _cfg(checkpoint=None)
    model = model_from_config(cfg, SMALL)
    path = str(tmp_path / "trunk.onnx")
    export_onnx(model, path)
    onnx_cfg = {**cfg, "runtime": "onnx", "onnx_file": path}
    built, meta = _both(onnx_cfg, SMALL, monkeypatch)
    assert meta == built == model.model_version()
    with pytest.raises(ModelError, match="was exported from model_version"):
        configured_model_version({**onnx_cfg, "head_seed": 1}, SMALL)
    with pytest.raises(ModelError, match="needs model.onnx_file"):
        configured_model_version({**onnx_cfg, "onnx_file": None}, SMALL)
