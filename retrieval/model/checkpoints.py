"""Checkpoints of the descriptor model (:mod:`retrieval.model.network`), and the model a config asks for.

A checkpoint is one ``torch.save`` dict ``{"format", "meta", "state_dict"}`` loadable from any fsspec
URL with ``weights_only=True``; ``meta["model_version"]`` is the model's fingerprint
(:meth:`~retrieval.model.network.DescriptorModel.model_version`), verified on load. A checkpoint of
an external backbone (torchscript / onnx) holds the heads only.

A trained mobilenet_v2 model may also be a compact ``.npz`` delta from the reproducible base (the shipped
default model, ``DEFAULT_MODEL``): :func:`load_delta` reads it; :mod:`retrieval.model.delta` writes it.

This module sits above :mod:`retrieval.model.network` (model.py never imports it).
"""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from retrieval import fsio
from retrieval.model.common import ModelError
from retrieval.model.network import (EXTERNAL_BACKBONES, DescriptorModel, ModelSpec, build_backbone,
                                      build_model, torch_load)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "retrieval-checkpoint-v1"
# compact "delta" checkpoints (.npz): read here, written by retrieval.model.delta.export_delta
DELTA_FORMAT = "retrieval-delta-v1"
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                             "default_model.npz")


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
    obj = torch_load(url, f"checkpoint not found: {url}",
                     lambda exc: f"checkpoint {url} is corrupt or not a retrieval checkpoint: "
                                 f"{exc.__class__.__name__}: {str(exc)[:200]}")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"checkpoint {url}: unknown format (expected {CHECKPOINT_FORMAT})")
    meta = dict(obj["meta"])
    recorded = meta.pop("model_version", None)
    spec = ModelSpec(**{k: meta[k] for k in ModelSpec.__dataclass_fields__ if k in meta})
    if spec.backbone in EXTERNAL_BACKBONES:
        from retrieval.model.external import load_external

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
# (the format is described in retrieval/model/delta.py, which writes it; reading it lives here,
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
        from retrieval.model.onnx_runtime import attach_onnx

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
