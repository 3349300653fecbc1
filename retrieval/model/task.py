"""The model inside a task (a Spark task, or the driver with ``--engine local``): built once per process
from plain config values, checked against the ``model_version`` the driver planned, and run on batches.
``retrieval extract`` (:mod:`retrieval.extract.job`) and ``retrieval fit`` (:mod:`retrieval.fit.job`) use it."""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from retrieval import fsio

# the model, once per process
_MODELS: dict[str, Any] = {}


def get_model(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any], device: str = "cpu"):
    """The model for this config, built once per (executor) process and cached; never pickled."""
    from retrieval.model.checkpoints import model_from_config

    key = json.dumps([dict(model_cfg), dict(preprocess_cfg), device], sort_keys=True)
    if key not in _MODELS:
        _MODELS[key] = model_from_config(model_cfg, preprocess_cfg).to(device).eval()
    return _MODELS[key]


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
    if model.model_version() != job.model_version:
        raise RuntimeError(f"executor built model_version {model.model_version()} but the driver "
                           f"planned {job.model_version}: the weights differ between machines")
    return model, device


def encode(model, role: str, hi: list, lo: list, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Batched forward. gallery: one R_hi pass -> adapter 1 + fine head; query: R_lo pass ->
    adapter 2, R_hi pass -> fine head."""
    import torch

    with torch.inference_mode():
        x_hi = torch.stack(hi).to(device)
        if role == "gallery":
            coarse, fine = model.encode_gallery(x_hi)
        else:
            coarse, fine = model.encode_query(torch.stack(lo).to(device), x_hi)
    return coarse.float().cpu().numpy(), fine.float().cpu().numpy()
