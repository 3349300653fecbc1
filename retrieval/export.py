"""``retrieval export``: the configured model written in another format (``--format onnx``: its trunk,
for ``model.runtime: onnx``). The stage's declaration; the library is :mod:`retrieval.model.export`."""
from __future__ import annotations

from typing import Any, Mapping

from retrieval import outputs
from retrieval.stage import Stage, arg


@outputs.leased
def export(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any = None) -> dict[str, Any]:
    """``retrieval export --format onnx --output URL``: the configured model's trunk."""
    from retrieval import fsio
    from retrieval.model.export import export_model

    fsio.configure(cfg["io.storage_options"])
    outputs.claim(output, outputs.identity("export", cfg, []), cfg, bool(inputs.get("overwrite")), file=True)
    return export_model(cfg["model"].to_dict(), cfg["preprocess"].to_dict(), inputs.get("format", "onnx"), output)


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
