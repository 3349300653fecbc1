"""``retrieval export``: the configured model written in another format (``--format onnx``: its trunk,
for ``model.runtime: onnx``; :mod:`retrieval.extract.onnx_runtime`).

The command sits above both the model (:func:`~retrieval.extract.checkpoints.model_from_config`, which
attaches an ONNX trunk when ``model.runtime: onnx``) and the ONNX runtime, so neither imports the other
back."""
from __future__ import annotations

from typing import Any, Mapping

from retrieval.stage import Stage, arg


def export(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any = None) -> dict[str, Any]:
    """``retrieval export --format onnx --output URL``: the configured model's trunk."""
    from retrieval import fsio
    from retrieval.extract.checkpoints import model_from_config
    from retrieval.extract.common import ModelError
    from retrieval.extract.onnx_runtime import export_onnx

    if inputs.get("format", "onnx") != "onnx":
        raise ModelError(f"unknown export format {inputs['format']!r}")
    fsio.configure(cfg["io.storage_options"])
    model_cfg = {**cfg["model"].to_dict(), "runtime": "torch"}
    model = model_from_config(model_cfg, cfg["preprocess"].to_dict())
    return export_onnx(model, output)


STAGE = Stage(
    name="export",
    help="the model's trunk (backbone + GeM) as an ONNX file for model.runtime=onnx",
    usage="--format onnx --output FILE",
    args=(
        arg("--format", choices=("onnx",), default="onnx", help="file format"),
        arg("--output", required=True, help="file URL to write (then --set model.runtime=onnx "
                                            "--set model.onnx_file=URL)"),
    ),
    run=export,
    engine=None,
)
