"""What the descriptor model (:mod:`retrieval.model.network`) shares with the backbones it can wrap
(:mod:`retrieval.model.external`, :mod:`retrieval.model.onnx_runtime`): the error type and the
input normalisation. It sits below all three, so they import it one way (no import circle)."""
from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(RuntimeError):
    """A model or checkpoint cannot be built or loaded (the message says which file and why)."""
