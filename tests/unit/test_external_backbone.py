"""The user's own descriptor model as the backbone (model.backbone: torchscript | onnx): exports of this
project's own model, made here, give the same descriptors; identity (model_version), checkpoints,
refusals of bad files, and training stages 2-3 on a frozen external backbone."""
from __future__ import annotations

import hashlib
import io
import pickle

import pytest
import torch
from torch import nn

from retrieval.model.checkpoints import load_checkpoint, model_from_config, save_checkpoint
from retrieval.model.network import ModelError, build_model
from tests.exports import Fine

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")   # torch.onnx.export (the TorchScript-based exporter) needs it

HI, LO = 96, 64   # preprocess.size_hi / size_lo of these tests (small: fast on CPU)
pytestmark = pytest.mark.usefixtures("one_torch_thread")



class Pooled(Fine):
    """Our model's GeM-pooled base feature (1280-d)."""

    def forward(self, x):
        return self.m.pooled(x)


class Uint8(Fine):
    """The fine descriptor from uint8 N x H x W x 3 (a deployed model's usual input)."""

    def forward(self, x):
        return self.m.fine(self.m.pooled(x.permute(0, 3, 1, 2).float() / 255.0))


def _onnx(module: nn.Module, x: torch.Tensor, path, dynamic: dict | None = None) -> str:
    nhwc = x.dtype == torch.uint8
    axes = {"images": {0: "n", 1: "h", 2: "w"} if nhwc else {0: "n", 2: "h", 3: "w"}, "emb": {0: "n"}}
    torch.onnx.export(module.eval(), (x,), str(path), dynamo=False, input_names=["images"],
                      output_names=["emb"], dynamic_axes=axes if dynamic is None else dynamic)
    return str(path)


def _script(module: nn.Module, x: torch.Tensor, path) -> str:
    torch.jit.trace(module.eval(), x).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def ref():
    return build_model("mobilenet_v2", "none", head_seed=0, size_hi=HI, size_lo=LO)


@pytest.fixture(scope="module")
def x():
    return torch.rand(3, 3, HI, HI, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def files(ref, x, tmp_path_factory):
    d = tmp_path_factory.mktemp("external")
    u8 = torch.round(x[:2] * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return {"ts": _script(Fine(ref), x[:2], d / "fine.torchscript.pt"),
            "onnx": _onnx(Fine(ref), x[:2], d / "fine.onnx"),
            "u8": _onnx(Uint8(ref), u8, d / "fine_u8.onnx"),
            "pooled": _onnx(Pooled(ref), x[:2], d / "pooled.onnx"),
            "other": _script(Fine(build_model("mobilenet_v2", "none", head_seed=1, size_hi=HI, size_lo=LO)),
                             x[:2], d / "other.torchscript.pt")}


def _build(kind: str, path: str, **kw):
    return build_model(kind, path, size_hi=HI, size_lo=LO, **kw)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


# ---------------------------------------------------------------------------------------------
# (1)-(3) the descriptors
@pytest.mark.parametrize("kind,key,layout", [("torchscript", "ts", "float_nchw"), ("onnx", "onnx", "float_nchw"),
                                             ("onnx", "u8", "uint8_nhwc")])
def test_exported_fine_descriptor_is_ours(ref, x, files, kind, key, layout):
    model = _build(kind, files[key])
    assert model.spec.input_layout == layout                 # auto: ONNX from the signature, TorchScript float
    assert model.spec.channels == 512 and isinstance(model.fine_head, nn.Identity)   # K == fine_dim
    assert not any(k.startswith(("backbone.", "pool.")) for k in model.state_dict())
    with torch.inference_mode():
        want = ref.fine(ref.pooled(x))
        coarse, fine = model.encode_gallery(x)
        cq, fq = model.encode_query(torch.nn.functional.interpolate(x, size=LO), x)
    assert fine.shape == (3, 512) and coarse.shape == (3, 128) and cq.shape == (3, 128)
    assert _cos(fine, want).min() > 0.999
    assert torch.allclose(fq, fine, atol=1e-5)
    for t in (coarse, fine, cq):
        assert torch.allclose(t.norm(dim=1), torch.ones(3), atol=1e-5)
    # adapter 2 is seeded as a copy of adapter 1's function, as for the other backbones
    p = model.pooled(x)
    assert torch.allclose(model.coarse_query(p), model.coarse_gallery(p), atol=1e-5)
    assert [(m.in_features, m.out_features) for m in model.adapter2 if isinstance(m, nn.Linear)] == \
        [(512, 1024), (1024, 128)]


def test_embedding_of_another_size_gets_a_linear_fine_head(ref, x, files):
    model = _build("onnx", files["pooled"])
    assert model.spec.channels == 1280 and model.spec.gem_p == 0.0
    assert isinstance(model.fine_head, nn.Linear) and model.fine_head.in_features == 1280
    assert model.adapter1.in_features == 1280
    with torch.inference_mode():
        assert _cos(model.pooled(x), ref.pooled(x)).min() > 0.999     # the embedding is the base feature
        coarse, fine = model.encode_gallery(x)
    assert fine.shape == (3, 512) and coarse.shape == (3, 128)
    again = _build("onnx", files["pooled"])                             # seeded init: deterministic
    assert torch.equal(again.fine_head.weight, model.fine_head.weight)


def test_fixed_batch_one_onnx_runs_row_by_row(ref, x, tmp_path):
    path = _onnx(Fine(ref), x[:1], tmp_path / "b1.onnx", dynamic={"images": {2: "h", 3: "w"}})
    model = _build("onnx", path)
    with torch.inference_mode():
        assert _cos(model.encode_gallery(x)[1], ref.fine(ref.pooled(x))).min() > 0.999


def test_onnx_session_is_made_per_process_and_never_pickled(x, files):
    model = _build("onnx", files["onnx"])
    with torch.inference_mode():
        before = model.encode_gallery(x)[1]
    assert set(model.backbone._sessions) == {"cpu"}
    blob = pickle.dumps(model)
    assert len(blob) < 4_000_000          # the heads (2.6 MB), not the model file (14 MB) nor a session
    clone = pickle.loads(blob)
    assert clone.backbone._sessions == {}
    with torch.inference_mode():
        assert torch.allclose(clone.encode_gallery(x)[1], before, atol=1e-6)   # re-created from the file
    sess = clone.backbone._sessions["cpu"]
    assert sess.get_session_options().intra_op_num_threads == torch.get_num_threads()


def test_prepare_normalises_as_the_formula_and_leaves_the_batch_alone(x, files):
    """The float layout's input is exactly ``(x - mean) / std`` (computed with one batch-sized tensor, the
    division in place), and the caller's batch is unchanged."""
    trunk = _build("onnx", files["onnx"]).backbone
    batch = x.clone()
    got = trunk.prepare(batch)
    assert torch.equal(batch, x) and got.data_ptr() != batch.data_ptr() and got.is_contiguous()
    assert torch.equal(got, ((x - trunk.mean) / trunk.std).contiguous())


# ---------------------------------------------------------------------------------------------
# (4) identity
def test_model_version_follows_the_model_file(files, tmp_path):
    a, b = _build("torchscript", files["ts"]), _build("torchscript", files["ts"])
    assert a.model_version() == b.model_version()
    assert a.spec.backbone_sha256 == hashlib.sha256(open(files["ts"], "rb").read()).hexdigest()
    assert _build("torchscript", files["other"]).model_version() != a.model_version()
    # the same bytes under another name: the same model
    copy = tmp_path / "copy.pt"
    copy.write_bytes(open(files["ts"], "rb").read())
    assert _build("torchscript", str(copy)).model_version() == a.model_version()
    assert _build("onnx", files["onnx"]).model_version() != a.model_version()
    meta = a.metadata()
    assert meta["backbone_sha256"] == a.spec.backbone_sha256 and meta["input_layout"] == "float_nchw"


def test_shipped_default_model_version_is_unchanged():
    from retrieval.model.delta import load_delta

    model = load_delta()
    assert model.model_version() == "709f1b048ba3dac7"   # the default model of issue 12
    assert "backbone_sha256" not in model.spec.fingerprint_fields()
    assert "input_layout" not in model.spec.fingerprint_fields()


# ---------------------------------------------------------------------------------------------
# (5) checkpoints
def test_checkpoint_holds_the_heads_and_needs_the_same_file(x, files, tmp_path):
    model = _build("onnx", files["u8"])
    url = str(tmp_path / "ck.pt")
    meta = save_checkpoint(model, url)
    obj = torch.load(url, weights_only=True)
    assert not any(k.startswith(("backbone.", "pool.")) for k in obj["state_dict"])
    assert meta["backbone_sha256"] == model.spec.backbone_sha256 and meta["input_layout"] == "uint8_nhwc"
    loaded = load_checkpoint(url, backbone_weights=files["u8"])
    assert loaded.model_version() == model.model_version() == meta["model_version"]
    with torch.inference_mode():
        assert torch.allclose(loaded.encode_gallery(x)[1], model.encode_gallery(x)[1], atol=1e-6)
    with pytest.raises(ModelError, match=rf"checkpoint {url} was made with backbone file sha256 "
                                         rf"{model.spec.backbone_sha256}; model.backbone_weights=.*fine.onnx has"):
        load_checkpoint(url, backbone_weights=files["onnx"])
    with pytest.raises(ModelError, match="set model.backbone_weights to that file"):
        load_checkpoint(url)
    # later stages: the checkpoint URL plus the same model.backbone / model.backbone_weights keys
    cfg = {"backbone": "onnx", "backbone_weights": files["u8"], "checkpoint": url, "input_layout": "auto"}
    pre = {"size_hi": HI, "size_lo": LO, "resize": "squash"}
    assert model_from_config(cfg, pre).model_version() == model.model_version()
    with pytest.raises(ModelError, match="sha256"):
        model_from_config({**cfg, "backbone_weights": files["ts"]}, pre)
    with pytest.raises(ModelError, match="mobilenet_v2 model"):
        model_from_config({**cfg, "checkpoint": "d.npz"}, pre)
    # checkpoint: default (the config default) is the shipped mobilenet_v2 model only for that
    # backbone: with the model file it means seeded heads on the file's embedding
    seeded = model_from_config({**cfg, "checkpoint": "default", "head_seed": 0, "fine_dim": 512,
                                "coarse_dim": 128, "gem_p": 3.0}, pre)
    assert seeded.spec.heads == "seed:0" and seeded.spec.backbone_sha256 == model.spec.backbone_sha256


def test_delta_format_refuses_external_backbones(files, tmp_path):
    from retrieval.model.delta import export_delta

    with pytest.raises(ModelError, match=r"\.npz delta format .* torchscript backbone"):
        export_delta(_build("torchscript", files["ts"]), str(tmp_path / "d.npz"))


# ---------------------------------------------------------------------------------------------
# (6) bad input: clear errors, before any work, naming the file
class _Conv(nn.Module):
    def __init__(self, c_in: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 8, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


class _Rank3(nn.Module):
    def forward(self, x):            # N x 3 x L
        return x.mean(dim=2).repeat(1, 4)


class _Map(_Conv):
    def forward(self, x):            # N x 8 x H' x W': not N x K
        return self.conv(x)


class _OneRow(_Conv):
    def forward(self, x):            # 1 x K whatever the batch
        return self.conv(x).mean(dim=(0, 2, 3)).unsqueeze(0)


def test_files_that_are_not_models(files, tmp_path):
    from PIL import Image

    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(jpeg)
    for kind in ("torchscript", "onnx"):
        with pytest.raises(ModelError, match=r"photo\.jpg.*JPEG image"):
            _build(kind, str(jpeg))
        with pytest.raises(ModelError, match=r"model file not found: .*missing\.bin"):
            _build(kind, str(tmp_path / "missing.bin"))
        with pytest.raises(ModelError, match="needs model.backbone_weights"):
            _build(kind, "default")
    state = tmp_path / "weights.pth"
    buf = io.BytesIO()
    torch.save(_Conv().state_dict(), buf)
    state.write_bytes(buf.getvalue())
    with pytest.raises(ModelError, match=r"weights\.pth: not a TorchScript model file: .*torch\.save file"):
        _build("torchscript", str(state))
    with pytest.raises(ModelError, match=r"weights\.pth: not a loadable ONNX model"):
        _build("onnx", str(state))
    with pytest.raises(ModelError, match=r"fine\.onnx: not a TorchScript model file"):
        _build("torchscript", files["onnx"])
    with pytest.raises(ModelError, match=r"fine\.torchscript\.pt: not a loadable ONNX model.*TorchScript"):
        _build("onnx", files["ts"])


def test_onnx_signatures_that_do_not_fit(tmp_path):
    x = torch.rand(2, 3, 32, 32)
    bad = {
        "rank3.onnx": (_Rank3(), torch.rand(2, 3, 40), {"images": {0: "n", 2: "l"}, "emb": {0: "n"}},
                       "is not rank 4"),
        "gray.onnx": (_Conv(1), torch.rand(2, 1, 32, 32), None, r"has 1 channels .*expected 3 \(RGB\)"),
        "gray_static.onnx": (_Conv(1), torch.rand(2, 1, 32, 32), {"images": {0: "n"}, "emb": {0: "n"}},
                             "no axis of 3 channels"),
        "map.onnx": (_Map(), x, {"images": {0: "n", 2: "h", 3: "w"}, "emb": {0: "n", 2: "a", 3: "b"}},
                     r"expected N x K \(2-D\)"),
        "onerow.onnx": (_OneRow(), x, {"images": {0: "n", 2: "h", 3: "w"}}, r"batch of 2 images to shape \(1, 8\)"),
        "fixed.onnx": (_Conv(), x, {"images": {0: "n"}, "emb": {0: "n"}}, "fixed image size 32 x 32"),
        "u8nchw.onnx": (_Conv(), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), None, "not a supported layout"),
    }
    for name, (module, example, axes, message) in bad.items():
        if example.dtype == torch.uint8:
            class Cast(nn.Module):
                def __init__(self, inner):
                    super().__init__()
                    self.inner = inner

                def forward(self, x):
                    return self.inner(x.float())
            module = Cast(module)
        path = _onnx(module, example, tmp_path / name,
                     dynamic=axes if axes is not None else {"images": {0: "n", 2: "h", 3: "w"}, "emb": {0: "n"}})
        with pytest.raises(ModelError, match=rf"{name.replace('.', '[.]')}.*{message}"):
            _build("onnx", path)
    # an explicit layout that the signature contradicts
    ok = _onnx(_Conv(), x, tmp_path / "float.onnx")
    with pytest.raises(ModelError, match=r"model.input_layout=uint8_nhwc but the ONNX input"):
        _build("onnx", ok, input_layout="uint8_nhwc")
    assert _build("onnx", ok).spec.channels == 8


def test_torchscript_outputs_that_do_not_fit(tmp_path):
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ModelError, match=r"map\.pt: the model maps a batch of 2 images to shape \(2, 8, "):
        _build("torchscript", _script(_Map(), x, tmp_path / "map.pt"))
    with pytest.raises(ModelError, match=r"onerow\.pt: the model maps a batch of 2 images to shape \(1, 8\)"):
        _build("torchscript", _script(_OneRow(), x, tmp_path / "onerow.pt"))
    with pytest.raises(ModelError, match=r"gray\.pt: a test forward .* failed"):
        _build("torchscript", _script(_Conv(1), torch.rand(2, 1, 32, 32), tmp_path / "gray.pt"))


# ---------------------------------------------------------------------------------------------
# (7) training: stage 1 refuses (the backbone is frozen), stages 2-3 train the heads
@pytest.fixture(scope="module")
def images():
    from retrieval.extract.preprocess import DecodePolicy
    from retrieval.sample import real_photos
    from retrieval.train.data import decode_all

    rows = []
    for p in real_photos("train")[:6]:
        with open(p, "rb") as fh:
            rows.append((p.rsplit("/", 1)[-1], p, fh.read(), None))
    return decode_all(rows, DecodePolicy(), max_side=128, source="real_photos(train)[:6]")


def _job(tmp_path, path, **train):
    from retrieval.config import load
    from retrieval.train import trainer

    sets = {"model.checkpoint": "", "model.backbone": "onnx", "model.backbone_weights": path,
            "preprocess.size_hi": HI, "preprocess.size_lo": LO, "train.batch_size": 6, "train.cache_views": 2,
            "train.seed": 0, "train.threads": 1, **train}
    return trainer.TrainJob.from_config("unused", str(tmp_path), load(overrides=sets))


def test_training_stage1_refuses_and_stage3_trains_adapter2(files, images, tmp_path):
    from retrieval.train import trainer
    from retrieval.train.dist import Dist

    job = _job(tmp_path, files["pooled"], **{"train.stages": [1, 2, 3]})
    model = model_from_config(job.model_cfg, job.preprocess_cfg)
    with pytest.raises(trainer.TrainError, match="the backbone is frozen"):
        trainer.trainable_names(model, 1)
    with pytest.raises(trainer.TrainError, match="the backbone is frozen"):
        trainer.run_training(job)
    assert trainer.backbone_block_count(model) == 0
    assert trainer.backbone_version(model) == trainer.backbone_version(model_from_config(job.model_cfg,
                                                                                         job.preprocess_cfg))
    cache = trainer.build_cache(model, images, job, Dist())
    assert cache.hi.shape == (len(images), 2, 1280) and cache.lo.shape == (len(images), 2, 1280)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for stage, cached in ((2, cache), (3, cache), (3, None)):
        job_s = trainer.TrainJob(**{**job.__dict__, "train_cfg": {**job.train_cfg, f"stage{stage}":
                                                                  {"steps": 2, "lr": 1e-3, "init": "keep"}}})
        summary = trainer.run_stage(model, job_s, images, stage, {"completed": {}, "losses": {}}, Dist(), cached)
        assert summary["final_loss"] is not None
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {k for k, _ in model.named_parameters() if k.startswith(("adapter1.", "adapter2.",
                                                                                "fine_head."))}


def test_training_run_with_stages_2_3_writes_a_loadable_checkpoint(files, images, tmp_path, monkeypatch):
    from retrieval.train import trainer

    monkeypatch.setattr(trainer, "load_images", lambda *a, **k: images)
    job = _job(tmp_path, files["onnx"], **{"train.stages": [2, 3], "train.stage2.steps": 2,
                                           "train.stage3.steps": 2, "train.progress_seconds": 60.0})
    card = trainer.run_training(job)
    model = load_checkpoint(str(tmp_path / "model.pt"), backbone_weights=files["onnx"])
    assert model.model_version() == card["model_version"] and model.spec.heads == "trained"
    assert model.spec.backbone == "onnx" and isinstance(model.fine_head, nn.Identity)


def test_config_keys():
    from retrieval.config import ConfigError, load

    cfg = load(sets=["model.backbone=torchscript", "model.backbone_weights=s3://bucket/sscd.pt",
                     "model.input_layout=uint8_nhwc"])
    assert cfg["model.backbone"] == "torchscript" and cfg["model.input_layout"] == "uint8_nhwc"
    assert load()["model.input_layout"] == "auto"
    with pytest.raises(ConfigError, match="model.input_layout"):
        load(sets=["model.input_layout=nchw"])
    with pytest.raises(ConfigError, match="model.backbone"):
        load(sets=["model.backbone=tflite"])
