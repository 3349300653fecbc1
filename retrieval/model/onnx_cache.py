"""``model.runtime: auto`` (the default): the built-in model's trunk runs on onnxruntime on CPU executors
and on torch on GPU executors, with no separate ``retrieval export``.

The driver (:func:`resolve_runtime`, called by the extraction job before any task) makes the ONNX trunk
once per ``model_version`` (:func:`~retrieval.model.onnx_runtime.export_onnx`: verified against the torch
trunk, max abs difference of the pooled feature <= ``ATOL``) into a cache folder, and records its sha256
beside it (``trunk-<model_version>.json``). The tasks get the file's URL and sha256 in their model
config: they only read it (no task builds a file, so executors never race), refuse a file whose sha256
differs, and check it once more against the torch trunk when they load it
(:func:`~retrieval.model.onnx_runtime.attach_onnx`). A cached file that no longer matches its record, or
fails that check (stale, altered, truncated), is refused and rebuilt by the next driver.

The cache folder (``model.onnx_cache: auto``): a hidden ``.onnx-cache/`` folder beside the model's file
(a ``.npz`` delta or checkpoint, ``model.checkpoint: default`` included) when that folder is local and
writable and the tasks run on the driver's machine (``--engine local``, Spark ``local[...]``), else
``<output>/_cache/`` (the shipped model may live in a read-only install, and on a cluster each node has
its own copy of it). Any other value is the folder to use (every executor must be able to read it).

Without onnxruntime (or onnx, which torch's exporter needs) ``auto`` runs torch with a warning: the same
rows, slower. A user's own model file (``model.backbone: torchscript | onnx``) runs on its own runtime.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from retrieval import fsio
from retrieval.model.common import ModelError

log = logging.getLogger(__name__)

CACHE_FOLDER = ".onnx-cache"    # beside the model's file
OUTPUT_CACHE = "_cache"         # in the output


def cache_folders(model_cfg: Mapping[str, Any], output_url: str | None, beside_model: bool = True) -> list[str]:
    """Where the trunk of ``model_cfg``'s model is looked for and built, in order (module doc).
    ``beside_model``: the tasks run on this machine (``--engine local``, Spark ``local[...]``), so they
    see a folder beside a local model file; on a cluster each node has its own install of the model,
    and the trunk goes where every task reads: the output's cache."""
    setting = model_cfg.get("onnx_cache") or "auto"
    if setting != "auto":
        return [setting]
    from retrieval.model.checkpoints import configured_checkpoint

    out = []
    ckpt = configured_checkpoint(model_cfg)
    if beside_model and ckpt and fsio.protocol_of(ckpt) in ("file", "local"):
        beside = os.path.join(os.path.dirname(os.path.abspath(fsio.strip_protocol(ckpt))), CACHE_FOLDER)
        parent = os.path.dirname(beside)
        if os.access(beside if os.path.isdir(beside) else parent, os.W_OK):
            out.append(beside)
    if output_url:
        out.append(fsio.join(output_url, OUTPUT_CACHE))
    return out


def _names(folder: str, version: str) -> tuple[str, str]:
    return fsio.join(folder, f"trunk-{version}.onnx"), fsio.join(folder, f"trunk-{version}.json")


def _cached(model: Any, folder: str) -> dict | None:
    """The verified trunk in ``folder`` (``{"onnx_file", "onnx_sha256"}``), or None (absent, or refused:
    a file that does not match its record or the torch trunk is left to be rebuilt)."""
    import copy

    from retrieval.model.onnx_runtime import attach_onnx

    url, record_url = _names(folder, model.model_version())
    if not (fsio.exists(url) and fsio.exists(record_url)):
        return None
    try:
        record = fsio.read_json(record_url)
        digest = fsio.sha256_file(url)
        if record.get("sha256") != digest or record.get("model_version") != model.model_version():
            raise ModelError(f"sha256 {digest[:12]} is not the {str(record.get('sha256'))[:12]} recorded "
                             f"for model_version {model.model_version()}")
        attach_onnx(copy.deepcopy(model).cpu(), url, expect_sha256=digest)
    except Exception as exc:
        log.warning("cached ONNX trunk %s refused (stale or altered: %s): rebuilding it", url,
                    " ".join(str(exc).split())[:300])
        return None
    return {"onnx_file": url, "onnx_sha256": digest}


def _build(model: Any, folder: str) -> dict:
    from retrieval.model.onnx_runtime import export_onnx

    url, record_url = _names(folder, model.model_version())
    info = export_onnx(model, url)
    fsio.write_json(record_url, {k: info[k] for k in ("model_version", "sha256", "bytes", "opset", "part",
                                                      "max_abs_diff")})
    log.info("model %s: ONNX trunk built in %s (max abs diff %.2g against torch)", info["model_version"],
             url, info["max_abs_diff"])
    return {"onnx_file": url, "onnx_sha256": info["sha256"]}


def ensure_trunk(model: Any, folders: list[str]) -> dict:
    """The trunk of ``model`` from the first folder that holds a verified one, else built into the first
    folder it can be written to: ``{"onnx_file", "onnx_sha256"}``."""
    for folder in folders:
        found = _cached(model, folder)
        if found:
            return found
    errors = []
    for folder in folders:
        try:
            return _build(model, folder)
        except (OSError, PermissionError) as exc:
            errors.append(f"{folder}: {exc}")
    raise ModelError("cannot write the ONNX trunk into any cache folder (" + "; ".join(errors) + ")")


def resolve_runtime(model_cfg: Mapping[str, Any], model: Any, output_url: str | None,
                    beside_model: bool = True) -> dict:
    """The model config the tasks get. ``runtime: auto`` with a built-in backbone, not forced onto a GPU,
    onnxruntime installed and no ``onnx_file`` given: ``onnx_file`` / ``onnx_sha256`` of the cached
    trunk (built here if needed). Otherwise ``model_cfg`` unchanged (torch; a warning when onnxruntime
    is missing)."""
    cfg = dict(model_cfg)
    if cfg.get("runtime", "auto") != "auto" or cfg.get("onnx_file") or model.external \
            or str(cfg.get("device", "auto")).startswith("cuda"):
        return cfg
    from retrieval.model.onnx_runtime import onnx_missing

    missing = onnx_missing()
    if missing:
        log.warning("model.runtime=auto: %s is not installed, so the model runs on torch (same rows, "
                    "slower on the CPU): pip install onnxruntime onnx", missing)
        return cfg
    cfg.update(ensure_trunk(model, cache_folders(cfg, output_url, beside_model)))
    return cfg
