"""The model inside a task (a Spark task, or the driver with ``--engine local``): built once per process
from plain config values, checked against the ``model_version`` the driver planned, and run on batches.
``retrieval extract`` (:mod:`retrieval.extract.job`) and ``retrieval fit`` (:mod:`retrieval.fit.job`) use it."""
from __future__ import annotations

import gc
import json
from typing import Any, Mapping

import numpy as np

from retrieval import fsio

# the model, once per process, with its model_version (hashing the weights: ~0.1-0.3 s a task otherwise)
_MODELS: dict[str, Any] = {}


def device_model_cfg(model_cfg: Mapping[str, Any], device: str) -> Mapping[str, Any]:
    """``model.runtime: auto`` on a GPU runs torch: the ONNX trunk the driver cached is for CPU tasks
    (retrieval/model/onnx_cache.py); an explicit ``runtime: onnx`` is left as asked."""
    if str(device) != "cpu" and model_cfg.get("runtime", "auto") == "auto" and model_cfg.get("onnx_file"):
        return {**model_cfg, "onnx_file": None, "onnx_sha256": None}
    return model_cfg


def get_model(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any], device: str = "cpu"):
    """The model for this config, built once per (executor) process and cached; never pickled."""
    from retrieval.model.checkpoints import model_from_config

    model_cfg = device_model_cfg(model_cfg, device)
    key = json.dumps([dict(model_cfg), dict(preprocess_cfg), device], sort_keys=True)
    if key not in _MODELS:
        model = model_from_config(model_cfg, preprocess_cfg).to(device).eval()
        object.__setattr__(model, "_precision", model_cfg.get("precision", "fp32"))   # what encode() runs
        object.__setattr__(model, "_built_version", model.model_version())   # tasks never change the weights
        _MODELS[key] = model
        _settle()
    return _MODELS[key]


def _settle() -> None:
    """In a Spark task: the process's modules and model leave the garbage collector's scans
    (``gc.freeze``). PySpark's reused workers run a full ``gc.collect()`` after every task, which
    over torch, onnxruntime and the model (~400k objects) took 0.18 s of wall and CPU per task, while
    the GIL was held; frozen, ~0. Only what exists now is frozen, after a collection."""
    from retrieval.engine import in_task

    if in_task():
        gc.collect()
        gc.freeze()


def built_version(model: Any) -> str:
    """The ``model_version`` of a model :func:`get_model` built (hashed once, when it was built)."""
    return model.__dict__.get("_built_version") or model.model_version()


def task_model(job, device: str | None = None):
    """In a task: fsspec options, torch threads, device, and the process's cached model for
    ``job`` (any job dataclass with model_cfg / preprocess_cfg / model_version / threads /
    storage_options), checked against the model_version the driver planned. Returns (model, device)."""
    import torch

    from retrieval.engine import task_device, task_threads

    fsio.configure(job.storage_options)
    device = device or task_device(job.model_cfg.get("device", "auto"))
    torch.set_num_threads(task_threads(job.threads))
    model = get_model(job.model_cfg, job.preprocess_cfg, device)
    version = built_version(model)
    if version != job.model_version:
        raise RuntimeError(f"executor built model_version {version} but the driver "
                           f"planned {job.model_version}: the weights differ between machines")
    return model, device


def _to_device(tensors: list, device: str):
    """One batch on ``device``: stacked straight into page-locked (pinned) host memory and copied
    asynchronously (``non_blocking``) on a GPU, so the copy overlaps the work queued before it."""
    import torch

    if not str(device).startswith("cuda"):
        return torch.stack(tensors)
    buf = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
    torch.stack(tensors, out=buf)
    return buf.to(device, non_blocking=True)


def _autocast(model, device: str):
    """``model.precision`` fp16 / bf16: the forward under autocast on a GPU (opt-in, docs/cluster.md
    "GPU executors"); fp32 (the default) and the CPU: no autocast."""
    import contextlib

    import torch

    precision = model.__dict__.get("_precision", "fp32")
    if precision == "fp32" or not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def encode(model, role: str, hi: list, lo: list, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Batched forward. gallery: one R_hi pass -> adapter 1 + fine head; query: R_lo pass ->
    adapter 2, R_hi pass -> fine head. On a GPU the batch travels through pinned memory
    (:func:`_to_device`) and ``model.precision`` may run it in half precision (:func:`_autocast`)."""
    import torch

    with torch.inference_mode(), _autocast(model, device):
        x_hi = _to_device(hi, device)
        if role == "gallery":
            coarse, fine = model.encode_gallery(x_hi)
        else:
            coarse, fine = model.encode_query(_to_device(lo, device), x_hi)
    return coarse.float().cpu().numpy(), fine.float().cpu().numpy()
