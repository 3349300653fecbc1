"""The configured model written in another format: the library part of ``retrieval export``
(:mod:`retrieval.export` is the stage's CLI adapter).

``onnx``: the built-in model's trunk (backbone + GeM), for ``model.runtime: onnx``
(:func:`retrieval.model.onnx_runtime.export_onnx`). A trained model as a compact ``.npz`` delta is
:func:`retrieval.model.delta.export_delta` (``retrieval train default-model``).

This module sits above both the model (:func:`~retrieval.model.checkpoints.model_from_config`, which
attaches an ONNX trunk when ``model.runtime: onnx``) and the ONNX runtime, so neither imports the other
back.
"""
from __future__ import annotations

from typing import Any, Mapping

from retrieval.model.checkpoints import model_from_config
from retrieval.model.common import ModelError
from retrieval.model.onnx_runtime import export_onnx

FORMATS = ("onnx",)


def export_model(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any], fmt: str,
                 output: str) -> dict[str, Any]:
    """Build the model the config asks for (its torch trunk, whatever ``model.runtime`` says) and
    write it as ``fmt`` to ``output``; returns what was written."""
    if fmt not in FORMATS:
        raise ModelError(f"unknown export format {fmt!r}")
    model = model_from_config({**dict(model_cfg), "runtime": "torch"}, preprocess_cfg)
    return export_onnx(model, output)
