"""Checkpoints of the descriptor model (:mod:`retrieval.model.network`), and the model a config asks for.

A checkpoint is one ``torch.save`` dict ``{"format", "meta", "state_dict"}`` loadable from any fsspec
URL with ``weights_only=True``; ``meta["model_version"]`` is the model's fingerprint
(:meth:`~retrieval.model.network.DescriptorModel.model_version`), verified on load. A checkpoint of
an external backbone (torchscript / onnx) holds the heads only.

A trained mobilenet_v2 model may also be a compact ``.npz`` delta from the reproducible base (the shipped
default model, ``DEFAULT_MODEL``): :mod:`retrieval.model.delta` reads and writes it.

This module sits above :mod:`retrieval.model.network` and :mod:`retrieval.model.delta` (neither imports
it). :mod:`retrieval.model.version` gives the ``model_version`` of the model a config asks for without
building it.
"""
from __future__ import annotations

import io
import logging
from typing import Any, Mapping

import torch
from torch import nn

from retrieval import fsio
from retrieval.model.common import ModelError
from retrieval.model.delta import DEFAULT_MODEL, load_delta
from retrieval.model.network import (EXTERNAL_BACKBONES, DescriptorModel, ModelSpec, build_backbone,
                                     build_model, torch_load)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "retrieval-checkpoint-v1"


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


def read_checkpoint(url: str, backbone_weights: str | None = None) -> tuple[dict, ModelSpec, str | None]:
    """A checkpoint file (weights only, no pickle code): ``(the saved dict, its spec, the recorded
    model_version)``. A checkpoint of an external backbone needs ``backbone_weights``, the model file
    it was made with (a clear error otherwise; the file itself is checked by the caller)."""
    obj = torch_load(url, f"checkpoint not found: {url}",
                     lambda exc: f"checkpoint {url} is corrupt or not a retrieval checkpoint: "
                                 f"{exc.__class__.__name__}: {str(exc)[:200]}")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"checkpoint {url}: unknown format (expected {CHECKPOINT_FORMAT})")
    meta = dict(obj["meta"])
    recorded = meta.pop("model_version", None)
    spec = ModelSpec.from_meta(meta)
    if spec.backbone in EXTERNAL_BACKBONES and (not backbone_weights or backbone_weights in ("default", "none")):
        made = spec.extra.get("backbone_file") if isinstance(spec.extra, dict) else None
        raise ModelError(f"checkpoint {url} was made with a {spec.backbone} model file as its backbone "
                         f"(sha256 {spec.backbone_sha256}{f', {made}' if made else ''}): set "
                         f"model.backbone_weights to that file (and model.backbone={spec.backbone})")
    return obj, spec, recorded


def load_checkpoint(url: str, device: str | torch.device = "cpu",
                    backbone_weights: str | None = None) -> DescriptorModel:
    """Load a checkpoint (weights only, no pickle code) and verify its model_version.

    A checkpoint of an external backbone (torchscript / onnx) holds the heads only: ``backbone_weights``
    must name the model file it was made with (same sha256; ``model_from_config`` passes
    ``model.backbone_weights``)."""
    obj, spec, recorded = read_checkpoint(url, backbone_weights)
    if spec.backbone in EXTERNAL_BACKBONES:
        from retrieval.model.external import load_external

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


def model_from_config(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any]) -> DescriptorModel:
    """The model the config asks for: a checkpoint (``default`` = the shipped trained model for the
    default backbone, mobilenet_v2, and seeded heads for any other; a ``.npz`` delta; or a full
    checkpoint), or backbone weights + seeded heads. ``model.runtime: onnx``: its trunk runs on
    onnxruntime from ``model.onnx_file`` (same model_version; retrieval/model/onnx_runtime.py);
    ``auto``: so does it when the driver put the cached trunk's file and sha256 in ``model_cfg``
    (retrieval/model/onnx_cache.py), else (or without onnxruntime here) torch."""
    model = _model_from_config(model_cfg, preprocess_cfg)
    runtime = model_cfg.get("runtime", "auto")
    if runtime == "onnx" or (runtime == "auto" and model_cfg.get("onnx_file")):
        from retrieval.model.onnx_runtime import attach_onnx, onnx_missing

        missing = onnx_missing() if runtime == "auto" else None
        if missing:
            log.warning("model.runtime=auto: %s is not installed here: the model runs on torch", missing)
        else:
            attach_onnx(model, model_cfg.get("onnx_file"), model_cfg.get("onnx_sha256"))
    return model


def configured_checkpoint(model_cfg: Mapping[str, Any]) -> str | None:
    """The file the config's model is loaded from: a ``.npz`` delta (``default``: the shipped one,
    ``DEFAULT_MODEL``), a full checkpoint, or None (backbone weights + seeded heads)."""
    ckpt = model_cfg.get("checkpoint")
    backbone = model_cfg["backbone"]
    if ckpt == "default" and backbone != "mobilenet_v2":
        # the shipped model is a mobilenet_v2 one: another backbone starts from its seeded heads
        # (then `retrieval fit` or training), without having to say model.checkpoint=null
        log.info("model.checkpoint=default is the shipped mobilenet_v2 model; model.backbone=%s: seeded "
                 "heads (head_seed %s)", backbone, model_cfg["head_seed"])
        return None
    if not ckpt:
        return None
    if ckpt == "default" or ckpt.endswith(".npz"):
        if backbone in EXTERNAL_BACKBONES:     # (checkpoint=default became seeded heads above)
            raise ModelError(f"model.checkpoint={ckpt}: a .npz delta is a mobilenet_v2 model; with "
                             f"model.backbone={backbone} set "
                             "model.checkpoint=null (seeded heads on the model file's embedding) or to a "
                             "full checkpoint (.pt) made with that file")
        return DEFAULT_MODEL if ckpt == "default" else ckpt
    return ckpt


def check_checkpoint_backbone(model_cfg: Mapping[str, Any], ckpt: str, spec: ModelSpec) -> None:
    """Refuse a checkpoint of another backbone when the config names an external model file (the
    checkpoint would ignore that file)."""
    backbone = model_cfg["backbone"]
    if backbone in EXTERNAL_BACKBONES and spec.backbone != backbone:
        raise ModelError(f"model.backbone={backbone} (model.backbone_weights="
                         f"{model_cfg.get('backbone_weights')}) but checkpoint {ckpt} is a "
                         f"{spec.backbone} model, which would ignore that file")


def _model_from_config(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any]) -> DescriptorModel:
    url = configured_checkpoint(model_cfg)
    if url is not None:
        ckpt = model_cfg.get("checkpoint")
        if url.endswith(".npz"):
            model = load_delta(url)
        else:
            model = load_checkpoint(url, backbone_weights=model_cfg.get("backbone_weights"))
            check_checkpoint_backbone(model_cfg, url, model.spec)
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
