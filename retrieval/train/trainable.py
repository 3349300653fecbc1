"""What each stage trains: the parameters it updates, the rest frozen."""
from __future__ import annotations

import torch
from torch import nn

from retrieval.model.network import DescriptorModel
from retrieval.train.job import TrainError, external_stage1_error


def backbone_block_count(model: DescriptorModel) -> int:
    """Trainable backbone blocks (0 for an external TorchScript / ONNX backbone: frozen, no blocks)."""
    return 0 if model.external or not isinstance(model.backbone, nn.Sequential) else len(model.backbone)


def trainable_names(model: DescriptorModel, stage: int, backbone_blocks: int = 0,
                    fine_head: bool = True) -> list[str]:
    """Names of the parameters stage ``stage`` updates (all others are frozen)."""
    if stage == 1:
        if model.external:
            raise external_stage1_error(model.spec.backbone)
        bb = model.backbone
        if not isinstance(bb, nn.Sequential):
            raise TrainError(f"backbone {type(bb).__name__} is not an nn.Sequential of blocks")
        start = 0 if backbone_blocks <= 0 or backbone_blocks >= len(bb) else len(bb) - backbone_blocks
        return [f"backbone.{i}.{n}" for i in range(start, len(bb)) for n, _ in bb[i].named_parameters()] \
            + ["pool.p"]
    if stage == 2:
        return [f"adapter1.{n}" for n, _ in model.adapter1.named_parameters()] + \
            ([f"fine_head.{n}" for n, _ in model.fine_head.named_parameters()] if fine_head else [])
    if stage == 3:
        return [f"adapter2.{n}" for n, _ in model.adapter2.named_parameters()]
    raise TrainError(f"unknown training stage {stage} (1, 2 or 3)")


def set_trainable(model: DescriptorModel, names: list[str]) -> list[nn.Parameter]:
    wanted = set(names)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            params.append(p)
    missing = wanted - {n for n, _ in model.named_parameters()}
    if missing:
        raise TrainError(f"no such parameters: {sorted(missing)[:5]}")
    model.eval()  # BatchNorm statistics stay frozen; no dropout in the trunk or heads
    return params


def pooled_partly_trainable(model: DescriptorModel, x: torch.Tensor, backbone_blocks: int) -> torch.Tensor:
    """``model.pooled(x)`` with the frozen leading blocks run without autograd (the CPU saving)."""
    if not backbone_block_count(model):
        return model.pooled(x)
    bb = model.backbone
    z = (x - model.mean) / model.std
    if 0 < backbone_blocks < len(bb):
        with torch.no_grad():
            z = bb[:len(bb) - backbone_blocks](z)
        z = bb[len(bb) - backbone_blocks:](z)
    else:
        z = bb(z)
    return model.pool(z)
