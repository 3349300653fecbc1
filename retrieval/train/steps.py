"""One step of each stage: (model, job, images, cache, step, local image indices) -> the loss."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from retrieval.train.cache import suffix_pooled
from retrieval.train.data import other_picker, same_view, view_rng
from retrieval.train.dist import Dist
from retrieval.train.losses import distill_loss, info_nce, koleo_loss, similarity_distill_loss
from retrieval.train.teacher import Teacher
from retrieval.train.trainable import pooled_partly_trainable


def _stage1_total(model, job, za, zp, teacher_emb: torch.Tensor | None, d: Dist) -> torch.Tensor:
    """InfoNCE (anchor R_hi vs positive R_lo) + KoLeo + the teacher's similarity distillation, on the
    global batch; the distillation compares the student's FINE descriptors of the anchor and positive
    views with the teacher's embeddings of the same views."""
    train_cfg = job.train_cfg
    za_all, zp_all = d.gather(F.normalize(za, dim=-1)), d.gather(F.normalize(zp, dim=-1))
    loss = info_nce(za_all, zp_all, float(train_cfg["temperature"]))
    if float(train_cfg.get("koleo") or 0.0):
        loss = loss + float(train_cfg["koleo"]) * koleo_loss(torch.cat([za_all, zp_all]))
    if teacher_emb is not None and float(train_cfg["teacher_weight"]):
        student = torch.cat([d.gather(model.fine(za)), d.gather(model.fine(zp))])
        loss = loss + float(train_cfg["teacher_weight"]) * similarity_distill_loss(
            student, torch.cat([d.gather(teacher_emb[0]), d.gather(teacher_emb[1])]),
            float(train_cfg["teacher_temperature"]))
    return loss


def _loss_stage1(model, job, images, cache, step, idx, d: Dist, teacher: Teacher | None = None) -> torch.Tensor:
    train_cfg, spec = job.train_cfg, model.spec
    blocks = int(train_cfg["backbone_blocks"])
    if cache is not None:  # cached activations entering the trainable blocks: anchor R_hi, positive R_lo
        pairs = [view_rng(train_cfg["seed"], 1, step, i).choice(cache.views, 2, replace=cache.views < 2) for i in idx]
        za = suffix_pooled(model, torch.stack([cache.hi[i, va] for i, (va, _) in zip(idx, pairs)]), cache.blocks)
        zp = suffix_pooled(model, torch.stack([cache.lo[i, vb] for i, (_, vb) in zip(idx, pairs)]), cache.blocks)
        temb = None
        if cache.teacher is not None:
            temb = (torch.stack([cache.teacher[i, va] for i, (va, _) in zip(idx, pairs)]).float(),
                    torch.stack([cache.teacher[i, vb] for i, (_, vb) in zip(idx, pairs)]).float())
        return _stage1_total(model, job, za, zp, temb, d)
    sizes = (spec.size_hi,) + ((teacher.size,) if teacher else ())
    strength, ops = train_cfg["augment_strength"], train_cfg["augmentations"]
    va = [same_view(images.images[i], view_rng(train_cfg["seed"], 1, step, i, 0), sizes, strength,
                    ops, spec.resize, other_picker(images, i)) for i in idx]
    vb = [same_view(images.images[i], view_rng(train_cfg["seed"], 1, step, i, 1), (spec.size_lo,) + sizes[1:],
                    strength, ops, spec.resize, other_picker(images, i)) for i in idx]
    za = pooled_partly_trainable(model, torch.stack([v[0] for v in va]), blocks)
    zp = pooled_partly_trainable(model, torch.stack([v[0] for v in vb]), blocks)
    temb = None
    if teacher is not None:
        with torch.no_grad():
            temb = (teacher.embed(torch.stack([v[1] for v in va])), teacher.embed(torch.stack([v[1] for v in vb])))
    return _stage1_total(model, job, za, zp, temb, d)


def _stage2_inputs(model, job, images, cache, step, idx) -> tuple[torch.Tensor, ...]:
    """Pooled (anchor view at R_hi, positive view at R_lo, positive view at R_hi)."""
    train_cfg, spec = job.train_cfg, model.spec
    if cache is not None:
        pairs = [view_rng(train_cfg["seed"], 2, step, i).choice(cache.views, 2, replace=cache.views < 2) for i in idx]
        return (torch.stack([cache.hi[i, va] for i, (va, _) in zip(idx, pairs)]).float(),
                torch.stack([cache.lo[i, vb] for i, (_, vb) in zip(idx, pairs)]).float(),
                torch.stack([cache.hi[i, vb] for i, (_, vb) in zip(idx, pairs)]).float())
    with torch.no_grad():
        va = [same_view(images.images[i], view_rng(train_cfg["seed"], 2, step, i, 0), (spec.size_hi,),
                        train_cfg["augment_strength"], train_cfg["augmentations"], spec.resize,
                        other_picker(images, i))[0]
              for i in idx]
        vb = [same_view(images.images[i], view_rng(train_cfg["seed"], 2, step, i, 1), (spec.size_hi, spec.size_lo),
                        train_cfg["augment_strength"], train_cfg["augmentations"], spec.resize, other_picker(images, i))
              for i in idx]
        return (model.pooled(torch.stack(va)), model.pooled(torch.stack([v[1] for v in vb])),
                model.pooled(torch.stack([v[0] for v in vb])))


def _loss_stage2(model, job, images, cache, step, idx, d: Dist) -> torch.Tensor:
    a_hi, p_lo, p_hi = _stage2_inputs(model, job, images, cache, step, idx)
    tau = float(job.train_cfg["temperature"])
    loss = info_nce(d.gather(model.coarse_gallery(a_hi)), d.gather(model.coarse_gallery(p_lo)), tau)
    if job.train_cfg["fine_head"]:
        loss = loss + info_nce(d.gather(model.fine(a_hi)), d.gather(model.fine(p_hi)), tau)
    return loss


def _loss_stage3(model, job, images, cache, step, idx, d: Dist) -> torch.Tensor:
    train_cfg, spec = job.train_cfg, model.spec
    if cache is not None:
        views = [int(view_rng(train_cfg["seed"], 3, step, i).integers(cache.views)) for i in idx]
        lo = torch.stack([cache.lo[i, v] for i, v in zip(idx, views)]).float()
        hi = torch.stack([cache.hi[i, v] for i, v in zip(idx, views)]).float()
    else:
        with torch.no_grad():
            pairs = [same_view(images.images[i], view_rng(train_cfg["seed"], 3, step, i), (spec.size_lo, spec.size_hi),
                               train_cfg["augment_strength"], train_cfg["augmentations"], spec.resize,
                               other_picker(images, i))
                     for i in idx]
            lo = model.pooled(torch.stack([p[0] for p in pairs]))
            hi = model.pooled(torch.stack([p[1] for p in pairs]))
    with torch.no_grad():
        teacher = model.coarse_gallery(hi)
    # the loss is a mean over samples: gather so that every process holds the global mean
    return distill_loss(d.gather(model.coarse_query(lo)), d.gather(teacher))


LOSSES: dict[int, Callable[..., torch.Tensor]] = {1: _loss_stage1, 2: _loss_stage2, 3: _loss_stage3}
