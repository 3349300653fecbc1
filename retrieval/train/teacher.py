"""The frozen teacher of stage 1's similarity distillation (``train.teacher``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from retrieval.model.checkpoints import load_checkpoint


@dataclass
class Teacher:
    """A frozen model whose embeddings stage 1's similarity distillation follows (``train.teacher``)."""
    url: str
    version: str
    size: int
    embed: Callable[[torch.Tensor], torch.Tensor]   # float RGB [0, 1] N x 3 x size x size -> N x K


def load_teacher(url: str, size: int, preprocess_cfg: dict) -> Teacher:
    """``.onnx`` -> an ONNX model, a name with ``torchscript`` / ``.ts`` -> TorchScript (their raw
    embedding); anything else is this project's checkpoint (its fine descriptor)."""
    from retrieval.model.network import build_model

    name = url.lower()
    kind = "onnx" if name.endswith(".onnx") else "torchscript" if ("torchscript" in name or name.endswith(".ts")) \
        else "checkpoint"
    if kind == "checkpoint":
        model = load_checkpoint(url).eval()
        return Teacher(url, model.model_version(), size, lambda x: model.fine(model.pooled(x)))
    model = build_model(kind, url, size_hi=size, size_lo=size, resize=preprocess_cfg.get("resize", "squash")).eval()
    return Teacher(url, model.model_version(), size, model.pooled)
