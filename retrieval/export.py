"""``retrieval export``: the configured model written in another format (``--format onnx``: its trunk,
for ``model.runtime: onnx``). The stage's CLI adapter; the library is :mod:`retrieval.model.export`."""
from __future__ import annotations

from typing import Any

from retrieval import fsio
from retrieval.model.export import export_model


def run_cli(args, cfg, engine) -> dict[str, Any]:
    """``retrieval export --format onnx --output URL``: the configured model's trunk."""
    fsio.configure(cfg["io.storage_options"])
    return export_model(cfg["model"].to_dict(), cfg["preprocess"].to_dict(), args.format, args.output)
