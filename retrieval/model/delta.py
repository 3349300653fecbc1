"""Compact "delta" checkpoints: a trained model stored as its difference from a reproducible base.

The base is ``build_model(backbone, "default", ..., head_seed)``: the sha256-verified offline ImageNet
weights plus the deterministic seeded heads, which every installation can rebuild. The file holds
only the tensors training changed, as per-row int8 deltas (large matrices) or exact float32 values
(biases, GeM p, BatchNorm), in a compressed ``.npz`` (no pickle: ``allow_pickle=False``) with the
metadata as JSON, including the ``model_version`` of the reconstructed weights, which loading
verifies. The repository ships the default model this way (``retrieval/assets/default_model.npz``):
a few MB instead of a 26 MB full checkpoint.

This module writes deltas (:func:`export_delta`, training only). Reading one -- the shipped default
model included -- is :func:`retrieval.model.checkpoints.load_delta` (with ``DEFAULT_MODEL``), so the feature
layer loads it without importing training code.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from retrieval import fsio
from retrieval.model.checkpoints import DELTA_FORMAT, apply_delta, delta_base
from retrieval.model.network import MOBILENET_V2_SHA256, DescriptorModel, ModelSpec

_QUANTISE_MIN = 4096  # tensors with fewer elements are stored exactly


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
