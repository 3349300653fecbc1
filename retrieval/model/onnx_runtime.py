"""The built-in model's trunk (backbone + GeM) run by onnxruntime on the CPU: ``retrieval export --format
onnx`` writes it, ``model.runtime: onnx`` + ``model.onnx_file: URL`` runs it.

Measured by ``tests/bench/bench_onnx.py`` on this project's CPU: the fp32 export gives the same
descriptors as torch (max abs difference ~3e-6 on the 128-d and 512-d outputs) several times faster
than torch's eager forward. The heads (fine head, adapters, whitening) stay in torch: they are a few
matrix products.

It is the same model, run differently, not a new one: the file is made from the model's own weights,
carries the ``model_version`` it was made from in its ONNX metadata, and loading checks both that and one
test forward against the torch trunk (max abs difference of the pooled feature <= ``ATOL``). So the
features keep the torch model's ``model_version`` and mix with features extracted by torch. A
quantised (int8) or otherwise altered file changes the descriptors and is refused here; such a file is
a model of its own: ``model.backbone: onnx`` (its sha256 enters its own ``model_version``).

The ONNX trunk is used for inference on the CPU only (no autograd: training runs torch; a model on a
GPU runs torch). The session takes ``torch.get_num_threads()`` intra-op threads when the model is built,
as a Spark task sets them (retrieval.model.task.task_model).

``model`` below is a :class:`~retrieval.model.network.DescriptorModel`; this module sits under
:mod:`retrieval.model.checkpoints` (whose ``model_from_config`` attaches the trunk) and does not import
it back. ``retrieval export`` is :mod:`retrieval.model.export` (the stage: :mod:`retrieval.export`).
"""
from __future__ import annotations

import copy
import io
import logging
import warnings
from typing import Any

import torch
from torch import nn

from retrieval import fsio
from retrieval.model.common import ModelError
from retrieval.model.spec import EXTERNAL_BACKBONES

log = logging.getLogger(__name__)

ATOL = 1e-4                  # pooled feature (1280-d, values ~0.1-2): fp32 exports measured ~3e-6
META_VERSION = "retrieval.model_version"
META_PART = "retrieval.part"
PART = "backbone+gem"
OPSET = 17


class _Trunk(nn.Module):
    """backbone + GeM on an ImageNet-normalised float32 N x 3 x H x W batch (the ``float_nchw`` layout)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone, self.pool = model.backbone, model.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.backbone(x))


def export_onnx(model: nn.Module, url: str, opset: int = OPSET) -> dict[str, Any]:
    """Write ``model``'s trunk as an ONNX file (float32, dynamic batch / height / width) to ``url``,
    check it against torch, and return what was written."""
    if model.external:
        raise ModelError(f"model.backbone={model.spec.backbone}: the backbone is already a model file; "
                         "export --format onnx exports the built-in backbones (mobilenet_v2, resnet18, resnet50)")
    try:
        import onnx
    except ImportError:
        raise ModelError("retrieval export --format onnx needs onnx and onnxruntime: "
                         "pip install 'retrieval[onnx]' onnx") from None
    trunk = _Trunk(copy.deepcopy(model).cpu().float()).eval()
    s = model.spec
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # the legacy (TorchScript-based) exporter's deprecation notice
        torch.onnx.export(trunk, (torch.rand(2, 3, s.size_hi, s.size_hi),), buf, dynamo=False,
                          opset_version=opset, input_names=["images"], output_names=["embedding"],
                          dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}, "embedding": {0: "n"}})
    proto = onnx.load_from_string(buf.getvalue())
    version = model.model_version()
    for key, value in ((META_VERSION, version), (META_PART, PART)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    fsio.write_bytes(url, data)
    diff = attach_onnx(copy.deepcopy(model).cpu(), url)._onnx_check
    import hashlib

    return {"output": url, "format": "onnx", "part": PART, "opset": opset, "model_version": version,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "max_abs_diff": diff,
            "use": f"--set model.runtime=onnx --set model.onnx_file={url}"}


def onnx_missing() -> str | None:
    """None when onnxruntime and onnx (which torch's exporter needs) import; else the missing one's name
    (``model.runtime: auto`` then runs torch: :mod:`retrieval.model.onnx_cache`)."""
    import importlib

    for name in ("onnxruntime", "onnx"):
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def _check_runtime(backbone: str, url: str | None) -> None:
    if backbone in EXTERNAL_BACKBONES:
        raise ModelError(f"model.runtime=onnx runs a built-in backbone through onnxruntime; model.backbone="
                         f"{backbone} is already a model file (set model.runtime=torch)")
    if not url:
        raise ModelError("model.runtime=onnx needs model.onnx_file = the file `retrieval export --format onnx` "
                         "wrote for this model")


def _check_made(url: str, session, version: str) -> None:
    """The ONNX file (its onnxruntime ``session``) was exported from the model ``version``."""
    made = session.get_modelmeta().custom_metadata_map.get(META_VERSION)
    if made != version:
        made = made or "(unknown: not a retrieval export)"
        raise ModelError(f"model.onnx_file={url} was exported from model_version {made}, but the configured "
                         f"model is {version}: run retrieval export --format onnx with this model's configuration")


def check_onnx_file(backbone: str, url: str | None, version: str) -> None:
    """``model.runtime: onnx``'s checks of the file that need no model (:mod:`retrieval.model.version`):
    a built-in backbone, a file, exported from ``version``. (Loading it also compares one forward with
    the torch trunk: :func:`attach_onnx`.)"""
    from retrieval.model.external import _onnx_session, read_model_file

    _check_runtime(backbone, url)
    data, _ = read_model_file(url)
    _check_made(url, _onnx_session(data, url, torch.device("cpu")), version)


def attach_onnx(model: nn.Module, url: str | None, expect_sha256: str | None = None) -> nn.Module:
    """Run ``model``'s trunk from the ONNX file ``url`` (made by :func:`export_onnx` from this model's
    weights); the model, its weights and its ``model_version`` are unchanged. ``expect_sha256``: refuse
    a file of other bytes (``model.runtime: auto``'s cached file, :mod:`retrieval.model.onnx_cache`)."""
    from retrieval.model.external import load_external

    _check_runtime(model.spec.backbone, url)
    s = model.spec
    version = model.model_version()
    try:
        trunk = load_external("onnx", url, "float_nchw", (s.size_hi, s.size_lo), expect_sha256=expect_sha256)
    except ModelError as exc:
        if expect_sha256 is None or "was made with backbone file sha256" not in str(exc):
            raise
        raise ModelError(f"the ONNX trunk {url} changed after the driver checked it (sha256 is not "
                         f"{expect_sha256[:12]}...): it is refused; rerun to rebuild it") from None
    _check_made(url, trunk._session(torch.device("cpu")), version)
    if trunk.dim != s.channels:
        raise ModelError(f"model.onnx_file={url}: {trunk.dim}-d output, the model's trunk has {s.channels}")
    probe = torch.rand(2, 3, s.size_lo, s.size_lo, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model.pool(model.backbone((probe - model.mean.cpu()) / model.std.cpu()).cpu()) \
            if next(model.parameters()).device.type == "cpu" else None
        got = trunk(probe)
    if want is not None:
        diff = float((want - got).abs().max())
        if not diff <= ATOL:
            raise ModelError(f"model.onnx_file={url} gives pooled features {diff:.3g} away from the torch model "
                             f"(> {ATOL}): a quantised or altered file changes the descriptors; use it as a "
                             "model of its own (model.backbone=onnx) or export again")
    else:
        diff = float("nan")
    object.__setattr__(model, "_onnx_trunk", trunk)   # not a submodule: no state_dict entries
    object.__setattr__(model, "_onnx_check", diff)
    log.info("model %s: trunk runs on onnxruntime from %s (sha256 %s, max abs diff %.2g)", version, url,
             trunk.sha256[:12], diff)
    return model

