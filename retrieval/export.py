"""``retrieval export``: the configured model written in another format (``--format onnx``: its trunk,
for ``model.runtime: onnx``; :mod:`retrieval.extract.onnx_runtime`).

The command sits above both the model (:func:`~retrieval.extract.checkpoints.model_from_config`, which
attaches an ONNX trunk when ``model.runtime: onnx``) and the ONNX runtime, so neither imports the other
back."""
from __future__ import annotations

from typing import Any

from retrieval import fsio, outputs
from retrieval.extract.common import ModelError
from retrieval.extract.checkpoints import model_from_config
from retrieval.extract.onnx_runtime import export_onnx


@outputs.leased
def run_cli(args, cfg, engine) -> dict[str, Any]:
    """``retrieval export --format onnx --output URL``: the configured model's trunk."""
    if args.format != "onnx":
        raise ModelError(f"unknown export format {args.format!r}")
    fsio.configure(cfg["io.storage_options"])
    outputs.claim(args.output, outputs.identity("export", cfg, []), cfg,
                  bool(getattr(args, "overwrite", False)), file=True)
    model_cfg = {**cfg["model"].to_dict(), "runtime": "torch"}
    model = model_from_config(model_cfg, cfg["preprocess"].to_dict())
    return export_onnx(model, args.output)
