import io

import pytest
import torch

from retrieval.model.checkpoints import load_checkpoint, save_checkpoint
from retrieval.model.network import GeM, ModelError, build_model


@pytest.fixture(scope="module")
def model():
    return build_model("mobilenet_v2", "default", head_seed=0)


def test_gem_p1_is_average_and_large_p_approaches_max():
    x = torch.rand(2, 5, 7, 7) + 0.01
    assert torch.allclose(GeM(1.0)(x), x.mean(dim=(-2, -1)), atol=1e-6)
    big = GeM(200.0)(x.double())
    assert torch.allclose(big, x.double().amax(dim=(-2, -1)), rtol=0.03)
    assert (GeM(3.0)(x) <= x.amax(dim=(-2, -1)) + 1e-6).all()
    assert isinstance(GeM(3.0).p, torch.nn.Parameter) and float(GeM().p) == 3.0


def test_shapes_norms_and_adapter_dims(model):
    x_hi, x_lo = torch.rand(3, 3, 224, 224), torch.rand(3, 3, 160, 160)
    with torch.inference_mode():
        c, f = model.encode_gallery(x_hi)
        cq, fq = model.encode_query(x_lo, x_hi)
    assert c.shape == (3, 128) and f.shape == (3, 512) and cq.shape == (3, 128)
    for t in (c, f, cq, fq):
        assert torch.allclose(t.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(f, fq, atol=1e-6)   # fine path is the same for both roles
    assert model.adapter1.in_features == 1280 and model.adapter1.out_features == 128
    a2 = [m for m in model.adapter2 if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in a2] == [(1280, 2560), (2560, 128)]  # spindle


def test_seeded_adapter2_reproduces_adapter1(model):
    p = torch.rand(4, 1280)
    with torch.inference_mode():
        assert torch.allclose(model.coarse_query(p), model.coarse_gallery(p), atol=1e-5)


def test_deterministic_and_seed_dependent(model):
    again = build_model("mobilenet_v2", "default", head_seed=0)
    other = build_model("mobilenet_v2", "default", head_seed=1)
    assert again.model_version() == model.model_version()
    assert other.model_version() != model.model_version()
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(model(x)[1], again(x)[1])


def test_imagenet_weights_are_the_verified_ones(model):
    # the bundled torchvision weights: a pretrained net has BN stats far from init (mean 0, var 1)
    bn = model.backbone[0][1]
    assert bn.running_var.mean().item() != pytest.approx(1.0, abs=0.05)


def test_checkpoint_round_trip_through_fsspec(model):
    url = "memory://ckpt/test/model.pt"
    meta = save_checkpoint(model, url, extra={"note": "test"})
    loaded = load_checkpoint(url)
    assert loaded.model_version() == model.model_version() == meta["model_version"]
    assert loaded.spec.extra["note"] == "test" and loaded.spec.size_lo == 160
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(loaded(x)[0], model(x)[0], atol=1e-6)


def test_altered_or_foreign_checkpoint_is_refused(model, tmp_path):
    import fsspec

    url = "memory://ckpt/test/altered.pt"
    save_checkpoint(model, url)
    obj = torch.load(io.BytesIO(fsspec.open(url, "rb").open().read()), weights_only=True)
    obj["state_dict"]["fine_head.bias"] += 1.0
    buf = io.BytesIO()
    torch.save(obj, buf)
    with fsspec.open(url, "wb") as fh:
        fh.write(buf.getvalue())
    with pytest.raises(ModelError, match="model_version mismatch"):
        load_checkpoint(url)
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="corrupt"):
        load_checkpoint(str(bad))
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_resnet_backbones_from_a_weights_file(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    m = build_model("resnet18", str(tmp_path / "r18.pth"))
    assert m.spec.channels == 512
    with torch.inference_mode():
        c, f = m.encode_gallery(torch.rand(1, 3, 64, 64))
    assert c.shape == (1, 128) and f.shape == (1, 512)
    with pytest.raises(ModelError, match="no offline default weights"):
        build_model("resnet50", "default")
    with pytest.raises(ModelError, match="does not fit"):
        build_model("resnet50", str(tmp_path / "r18.pth"))
