"""This project's own model as a single embedding module, for the TorchScript / ONNX exports the
user's-own-model tests make (``model.backbone: torchscript | onnx``)."""
from __future__ import annotations

from torch import nn


class Fine(nn.Module):
    """Our model's fine descriptor as one module: float N x 3 x H x W in [0, 1] -> N x 512."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m.fine(self.m.pooled(x))
