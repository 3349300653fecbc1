"""Compact "delta" checkpoints: a trained model stored as its difference from a reproducible base.

The base is ``build_model(backbone, "default", ..., head_seed)``: the sha256-verified offline ImageNet
weights plus the deterministic seeded heads, which every installation can rebuild. The file holds
only the tensors training changed, as per-row int8 deltas (large matrices) or exact float32 values
(biases, GeM p, BatchNorm), in a compressed ``.npz`` (no pickle: ``allow_pickle=False``) with the
metadata as JSON, including the ``model_version`` of the reconstructed weights, which loading
verifies. The repository ships the default model this way (``retrieval/assets/default_model.npz``):
a few MB instead of a 26 MB full checkpoint.

:func:`export_delta` writes a delta (training, ``retrieval train default-model``); :func:`load_delta` reads
one (``model.checkpoint: default`` is ``DEFAULT_MODEL``, the shipped file), so extraction loads it without
importing training code; :func:`delta_meta` reads the metadata alone (:mod:`retrieval.model.version`).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from retrieval import fsio
from retrieval.model.common import ModelError
from retrieval.model.network import DescriptorModel, build_model
from retrieval.model.spec import EXTERNAL_BACKBONES, MOBILENET_V2_SHA256, ModelSpec

_QUANTISE_MIN = 4096  # tensors with fewer elements are stored exactly
DELTA_FORMAT = "retrieval-delta-v1"
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                             "default_model.npz")


# -- reading -----------------------------------------------------------------------------------------
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


def _read(url: str, meta_only: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """A delta file's metadata and (unless ``meta_only``) its arrays; a clear error for anything else."""
    try:
        data = fsio.read_bytes(url)
    except FileNotFoundError:
        raise ModelError(f"delta checkpoint not found: {url}") from None
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        meta = json.loads(npz["__meta__"].tobytes().decode())
        arrays = {} if meta_only else {k: npz[k] for k in npz.files if k != "__meta__"}
    except Exception as exc:
        raise ModelError(f"{url}: not a delta checkpoint ({exc.__class__.__name__}: {exc})") from None
    if meta.get("format") != DELTA_FORMAT:
        raise ModelError(f"{url}: unknown format {meta.get('format')!r} (expected {DELTA_FORMAT})")
    return meta, arrays


def delta_meta(url: str = DEFAULT_MODEL) -> dict:
    """A delta file's metadata (spec, head_seed, tensors, recorded ``model_version``), tensors unread."""
    return _read(url, meta_only=True)[0]


def load_delta(url: str = DEFAULT_MODEL) -> DescriptorModel:
    """Rebuild the model a delta file describes and verify its ``model_version``."""
    meta, arrays = _read(url)
    spec = ModelSpec.from_meta(meta["spec"])
    model = delta_base(spec, int(meta["head_seed"]))
    apply_delta(model, arrays, list(meta["tensors"]))
    model.spec = spec
    actual = model.model_version()
    if actual != meta["model_version"]:
        raise ModelError(f"{url}: model_version mismatch (recorded {meta['model_version']}, rebuilt "
                         f"{actual}): the file or the base weights differ")
    return model.eval()


# -- writing -----------------------------------------------------------------------------------------
def export_delta(model: DescriptorModel, url: str, head_seed: int = 0,
                 card: dict[str, Any] | None = None) -> DescriptorModel:
    """Write ``model`` as a delta from the default base; returns the model the file reconstructs
    (int8 rounding of the deltas makes it differ slightly: evaluate THAT one)."""
    spec = model.spec
    base = delta_base(spec, head_seed)
    base_sd, sd = base.state_dict(), model.state_dict()
    arrays: dict[str, np.ndarray] = {}
    names = []
    for name, value in sd.items():
        ref = base_sd[name]
        if torch.equal(value, ref):
            continue
        names.append(name)
        if value.ndim >= 2 and value.numel() >= _QUANTISE_MIN and value.is_floating_point():
            delta = (value.float() - ref.float()).reshape(value.shape[0], -1)
            scale = delta.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            arrays[f"{name}::q"] = torch.round(delta / scale[:, None]).clamp(-127, 127).to(torch.int8).numpy()
            arrays[f"{name}::scale"] = scale.numpy().astype(np.float32)
        else:
            arrays[f"{name}::value"] = value.detach().cpu().numpy().copy()
    apply_delta(base, arrays, names)
    base.spec = ModelSpec(**{**asdict(spec), "extra": {**spec.extra, **({"card": card} if card else {})}})
    meta = {"format": DELTA_FORMAT, "spec": asdict(base.spec), "head_seed": int(head_seed),
            "backbone_weights_sha256": MOBILENET_V2_SHA256 if spec.backbone == "mobilenet_v2" else None,
            "tensors": names, "model_version": base.model_version()}
    buf = io.BytesIO()
    np.savez_compressed(buf, __meta__=np.frombuffer(json.dumps(meta, default=str).encode(), np.uint8), **arrays)
    fsio.write_bytes(url, buf.getvalue())
    return base.eval()
