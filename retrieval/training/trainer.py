"""The three training stages of METHOD.md, resumable and data-parallel.

1. ``backbone``: InfoNCE (temperature ``train.temperature``) between the L2-normalised GeM-pooled
   features of an anchor view at R_hi and a positive view at R_lo of the same image; the other images
   of the global batch are the negatives. Trainable: the last ``train.backbone_blocks`` blocks of the
   backbone (0 = all) and GeM's p; BatchNorm statistics stay frozen (eval mode). Heads frozen.
   Optional terms: ``train.koleo`` x the KoLeo regulariser on the batch's pooled features, and with
   ``train.teacher`` (:func:`load_teacher`) ``train.teacher_weight`` x a similarity distillation
   (:func:`similarity_distill_loss`) of the student's fine descriptors of the anchor and positive
   views toward the teacher's embeddings of the same augmented pictures (cached per view).
2. ``adapter1``: backbone + pooling frozen; the same loss on adapter-1 outputs (anchor R_hi, positive
   R_lo). With ``train.fine_head`` the fine head is trained by the same loss on two R_hi views.
3. ``adapter2``: everything else frozen; ``mean(1 - cos(adapter2(pooled(lo)), adapter1(pooled(hi))))``
   where lo/hi are the SAME augmented picture at R_lo and R_hi (a distillation). Adapter 2 starts as an
   exact copy of (the trained) adapter 1's function (``train.stage3.init: adapter1``; ``keep`` starts
   from its current weights).

With ``train.cache_views > 0`` the frozen part of the network runs once per cached view
(``cache_views`` per image; view 0 is the clean image; each view is one augmentation encoded at R_hi
and R_lo), stored under ``<output>/_cache/``: stage 1 trains its last blocks on the cached activations
entering them, stages 2-3 read GeM-pooled features (derived from those activations after stage 1,
or computed directly). ``cache_views: 0`` draws fresh views every step instead (any backbone block
count, slower).

Every ``checkpoint_every`` steps and at the end of each stage the main process writes
``checkpoints/stage<S>-step<NNNNNN>.pt`` (a model checkpoint with metadata and ``model_version``),
its optimiser state ``.optim.pt`` and model card ``.card.json``, then ``_train_state.json`` LAST;
a rerun with ``train.resume`` continues from there. At the end: ``model.pt``, ``model_card.json``,
``model_card.md``. Views, batches and learning rates are functions of (seed, stage, step), so a rerun,
a resumed run and a data-parallel run draw the same batches.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval import fsio
from retrieval.features.model import (EXTERNAL_BACKBONES, DescriptorModel, backbone_version, load_checkpoint,
                                      model_from_config, save_checkpoint)
from retrieval.features.preprocess import DecodePolicy
from retrieval.progress import Progress
from retrieval.training import card as card_mod
from retrieval.training.data import ImageSet, load_images, other_picker, same_view, view_rng
from retrieval.training.dist import Dist

log = logging.getLogger(__name__)

STAGES = {1: "backbone", 2: "adapter1", 3: "adapter2"}
STATE = "_train_state.json"
CACHE_KEY = 9  # view-key namespace of the cached views


class TrainError(RuntimeError):
    """The training job cannot go on (the message says why and what to change)."""


@dataclass(frozen=True)
class TrainJob:
    """Plain values (picklable: shipped to TorchDistributor processes)."""
    input: str
    output: str
    model_cfg: dict
    preprocess_cfg: dict
    train_cfg: dict
    input_format: str = "auto"
    key_column: str | None = None
    bytes_column: str | None = None

    @classmethod
    def from_config(cls, input_url: str, output_url: str, cfg) -> "TrainJob":
        return cls(input_url, output_url, cfg["model"].to_dict(), cfg["preprocess"].to_dict(),
                   cfg["train"].to_dict(), cfg["extract.input_format"], cfg["extract.key_column"],
                   cfg["extract.bytes_column"])

    @property
    def t(self) -> dict:
        return self.train_cfg

    def stage_cfg(self, stage: int) -> dict:
        return self.train_cfg[f"stage{stage}"]

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoints."""
        keep = ("seed", "batch_size", "temperature", "augment_strength", "augmentations", "max_side",
                "backbone_blocks", "fine_head", "cache_views", "stage1", "stage2", "stage3")
        # model.input_layout at its default is left out: runs written before the key existed still resume
        model = {k: v for k, v in self.model_cfg.items() if not (k == "input_layout" and v == "auto")}
        train = {k: self.train_cfg[k] for k in keep}
        # the stage-1 regularisers join the fingerprint only when on (runs from before they existed resume)
        if self.train_cfg.get("koleo"):
            train["koleo"] = self.train_cfg["koleo"]
        if self.train_cfg.get("teacher"):
            train.update({k: self.train_cfg[k] for k in ("teacher", "teacher_weight", "teacher_temperature",
                                                        "teacher_size")})
        return {"input": self.input, "model": model, "preprocess": self.preprocess_cfg, "train": train}


def _external_stage1(backbone: str) -> TrainError:
    return TrainError(f"training stage 1 trains the backbone, but model.backbone={backbone} is your own model "
                      "file: the backbone is frozen. Train the heads only: train.stages=[2, 3]")


def backbone_block_count(model: DescriptorModel) -> int:
    """Trainable backbone blocks (0 for an external TorchScript / ONNX backbone: frozen, no blocks)."""
    return 0 if model.external or not isinstance(model.backbone, nn.Sequential) else len(model.backbone)


# ---------------------------------------------------------------------------------------------
# what each stage trains, and the losses
def trainable_names(model: DescriptorModel, stage: int, backbone_blocks: int = 0,
                    fine_head: bool = True) -> list[str]:
    """Names of the parameters stage ``stage`` updates (all others are frozen)."""
    if stage == 1:
        if model.external:
            raise _external_stage1(model.spec.backbone)
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


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row i's positive is ``positive[i]``; every other row of ``positive`` is a negative."""
    a, p = F.normalize(anchor, dim=-1), F.normalize(positive, dim=-1)
    logits = a @ p.T / temperature
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(student, teacher)); the teacher gets no gradient."""
    return (1.0 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()


def koleo_loss(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The KoLeo regulariser (Sablayrolles et al. 2019; SSCD's entropy term, DINOv2):
    ``-mean(log(distance to the nearest other row))`` of the L2-normalised rows; spreads the batch."""
    z = F.normalize(z, dim=-1)
    with torch.no_grad():
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    return -torch.log(F.pairwise_distance(z, z[nearest], eps=eps) + eps).mean()


def similarity_distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) between each row's softmax over its similarities to the OTHER rows of the
    batch (cosine / ``temperature``): the student learns the teacher's similarity structure, whatever
    the two embeddings' dimensions. The teacher gets no gradient."""
    n = len(student)
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    s, t = F.normalize(student, dim=-1), F.normalize(teacher.detach().float(), dim=-1)
    log_s = F.log_softmax((s @ s.T)[off].view(n, n - 1) / temperature, dim=1)
    log_t = F.log_softmax((t @ t.T)[off].view(n, n - 1) / temperature, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


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
    from retrieval.features.model import build_model

    name = url.lower()
    kind = "onnx" if name.endswith(".onnx") else "torchscript" if ("torchscript" in name or name.endswith(".ts")) \
        else "checkpoint"
    if kind == "checkpoint":
        model = load_checkpoint(url).eval()
        return Teacher(url, model.model_version(), size, lambda x: model.fine(model.pooled(x)))
    model = build_model(kind, url, size_hi=size, size_lo=size, resize=preprocess_cfg.get("resize", "squash")).eval()
    return Teacher(url, model.model_version(), size, model.pooled)


def lr_at(step: int, steps: int, base: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 5% of ``base``."""
    warm = max(1, steps // 20)
    if step <= warm:
        return base * step / warm
    t = (step - warm) / max(1, steps - warm)
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


def batch_indices(seed: int, stage: int, step: int, n: int, size: int) -> np.ndarray:
    return view_rng(seed, 1000 + stage, step).permutation(n)[:size]


# ---------------------------------------------------------------------------------------------
# feature caches: the frozen part of the network runs once per cached view
@dataclass
class FeatureCache:
    """``hi``/``lo``: N x V x ... float16, one entry per (image, view). ``blocks == 0``: GeM-pooled
    features (stages 2-3); ``blocks > 0``: activations entering the last ``blocks`` backbone blocks
    (stage 1 trains those blocks on them; stages 2-3 derive pooled features from them)."""
    hi: torch.Tensor
    lo: torch.Tensor
    blocks: int = 0
    teacher: torch.Tensor | None = None    # N x V x K float16: the teacher's embedding of each view

    @property
    def views(self) -> int:
        return self.hi.shape[1]


PooledCache = FeatureCache


def _prefix(model: DescriptorModel, x: torch.Tensor, blocks: int) -> torch.Tensor:
    if not blocks or not backbone_block_count(model):
        return model.pooled(x)
    z = (x - model.mean) / model.std
    return model.backbone[:len(model.backbone) - blocks](z)


def suffix_pooled(model: DescriptorModel, act: torch.Tensor, blocks: int) -> torch.Tensor:
    """Pooled features from cached activations (with autograd through the last ``blocks`` blocks)."""
    act = act.float()
    if not blocks:
        return act
    return model.pool(model.backbone[len(model.backbone) - blocks:](act))


@torch.no_grad()
def pooled_cache(model: DescriptorModel, cache: FeatureCache, chunk: int = 256) -> FeatureCache:
    """The pooled-feature cache implied by ``cache`` and the model's current last blocks."""
    if not cache.blocks:
        return cache
    out = []
    for t in (cache.hi, cache.lo):
        flat = t.flatten(0, 1)
        pooled = torch.cat([suffix_pooled(model, flat[k:k + chunk], cache.blocks).half()
                            for k in range(0, len(flat), chunk)])
        out.append(pooled.view(t.shape[0], t.shape[1], -1))
    return FeatureCache(out[0], out[1], 0, cache.teacher)


def _views_key(images: ImageSet, job: TrainJob) -> str:
    t = job.t
    ops_key = hashlib.sha256(",".join(t["augmentations"]).encode()).hexdigest()[:8]
    return f"{images.fingerprint()}-v{int(t['cache_views'])}-s{t['augment_strength']}-a{ops_key}-seed{t['seed']}"


@torch.no_grad()
def build_cache(model: DescriptorModel, images: ImageSet, job: TrainJob, d: Dist, blocks: int = 0,
                chunk: int = 32, teacher: Teacher | None = None) -> FeatureCache:
    """The cached views' features (``blocks`` > 0: activations entering the last ``blocks`` blocks;
    else pooled); with ``teacher``, also the teacher's embedding of every view (its own cache file:
    the student's cache is the one a run without a teacher writes)."""
    t, spec = job.t, model.spec
    n_views = int(t["cache_views"])
    kind = f"prefix{blocks}" if blocks else "pooled"
    url = fsio.join(job.output, "_cache", f"{kind}-{backbone_version(model)}-{_views_key(images, job)}.pt")
    t_url = (fsio.join(job.output, "_cache", f"teacher-{teacher.version}-{teacher.size}-{_views_key(images, job)}.pt")
             if teacher else None)
    have = torch.load(io.BytesIO(fsio.read_bytes(url)), map_location="cpu", weights_only=True) \
        if fsio.exists(url) else None
    if have is not None:
        log.info("%s features from cache %s", kind, url)
        if t_url is None or fsio.exists(t_url):
            tobj = torch.load(io.BytesIO(fsio.read_bytes(t_url)), map_location="cpu", weights_only=True) \
                if t_url else {}
            return FeatureCache(have["hi"], have["lo"], blocks, tobj.get("teacher"))
    mine = [i for i in range(len(images)) if i % d.world == d.rank]
    progress = Progress(f"{kind} feature cache (rank {d.rank})", total=len(mine) * n_views,
                        every=float(t["progress_seconds"]), unit="views")
    todo: list[tuple[int, int, list[torch.Tensor]]] = []
    out: dict[int, tuple[list, ...]] = {i: ([None] * n_views, [None] * n_views, [None] * n_views) for i in mine}
    sizes = (spec.size_hi, spec.size_lo) + ((teacher.size,) if teacher else ())

    def flush() -> None:
        if not todo:
            return
        if have is None:
            p_hi = _prefix(model, torch.stack([x[2][0] for x in todo]), blocks).half()
            p_lo = _prefix(model, torch.stack([x[2][1] for x in todo]), blocks).half()
        else:     # only the teacher's embeddings are missing
            p_hi, p_lo = [None] * len(todo), [None] * len(todo)
        p_t = teacher.embed(torch.stack([x[2][2] for x in todo])).half() if teacher else [None] * len(todo)
        for (i, v, _), a, b, c in zip(todo, p_hi, p_lo, p_t):
            out[i][0][v], out[i][1][v], out[i][2][v] = a, b, c
        progress.update(len(todo))
        todo.clear()

    for i in mine:
        for v in range(n_views):
            strength = 0.0 if v == 0 else float(t["augment_strength"])
            views = same_view(images.images[i], view_rng(t["seed"], CACHE_KEY, i, v), sizes, strength,
                              t["augmentations"], spec.resize, other_picker(images, i))
            todo.append((i, v, views))
            if len(todo) >= chunk:
                flush()
    flush()
    progress.finish()
    merged: dict[int, tuple] = {}
    for part in d.gather_objects({i: tuple(torch.stack(x) if x[0] is not None else None for x in views)
                                  for i, views in out.items()}):
        merged.update(part)
    n = len(images)
    cache = FeatureCache(torch.stack([merged[i][0] for i in range(n)]) if have is None else have["hi"],
                         torch.stack([merged[i][1] for i in range(n)]) if have is None else have["lo"], blocks,
                         torch.stack([merged[i][2] for i in range(n)]) if teacher else None)
    if d.main:
        for target, obj in ((url if have is None else None, {"hi": cache.hi, "lo": cache.lo}),
                            (t_url, {"teacher": cache.teacher})):
            if target:
                buf = io.BytesIO()
                torch.save(obj, buf)
                fsio.write_bytes(target, buf.getvalue())
    return cache


# ---------------------------------------------------------------------------------------------
# one step of each stage: (model, job, images, cache, step, local image indices) -> local pieces
def _stage1_total(model, job, za, zp, teacher_emb: torch.Tensor | None, d: Dist) -> torch.Tensor:
    """InfoNCE (anchor R_hi vs positive R_lo) + KoLeo + the teacher's similarity distillation, on the
    global batch; the distillation compares the student's FINE descriptors of the anchor and positive
    views with the teacher's embeddings of the same views."""
    t = job.t
    za_all, zp_all = d.gather(F.normalize(za, dim=-1)), d.gather(F.normalize(zp, dim=-1))
    loss = info_nce(za_all, zp_all, float(t["temperature"]))
    if float(t.get("koleo") or 0.0):
        loss = loss + float(t["koleo"]) * koleo_loss(torch.cat([za_all, zp_all]))
    if teacher_emb is not None and float(t["teacher_weight"]):
        student = torch.cat([d.gather(model.fine(za)), d.gather(model.fine(zp))])
        loss = loss + float(t["teacher_weight"]) * similarity_distill_loss(
            student, torch.cat([d.gather(teacher_emb[0]), d.gather(teacher_emb[1])]), float(t["teacher_temperature"]))
    return loss


def _loss_stage1(model, job, images, cache, step, idx, d: Dist, teacher: Teacher | None = None) -> torch.Tensor:
    t, spec = job.t, model.spec
    blocks = int(t["backbone_blocks"])
    if cache is not None:  # cached activations entering the trainable blocks: anchor R_hi, positive R_lo
        pairs = [view_rng(t["seed"], 1, step, i).choice(cache.views, 2, replace=cache.views < 2) for i in idx]
        za = suffix_pooled(model, torch.stack([cache.hi[i, va] for i, (va, _) in zip(idx, pairs)]), cache.blocks)
        zp = suffix_pooled(model, torch.stack([cache.lo[i, vb] for i, (_, vb) in zip(idx, pairs)]), cache.blocks)
        temb = None
        if cache.teacher is not None:
            temb = (torch.stack([cache.teacher[i, va] for i, (va, _) in zip(idx, pairs)]).float(),
                    torch.stack([cache.teacher[i, vb] for i, (_, vb) in zip(idx, pairs)]).float())
        return _stage1_total(model, job, za, zp, temb, d)
    sizes = (spec.size_hi,) + ((teacher.size,) if teacher else ())
    va = [same_view(images.images[i], view_rng(t["seed"], 1, step, i, 0), sizes, t["augment_strength"],
                    t["augmentations"], spec.resize, other_picker(images, i)) for i in idx]
    vb = [same_view(images.images[i], view_rng(t["seed"], 1, step, i, 1), (spec.size_lo,) + sizes[1:],
                    t["augment_strength"], t["augmentations"], spec.resize, other_picker(images, i)) for i in idx]
    za = pooled_partly_trainable(model, torch.stack([v[0] for v in va]), blocks)
    zp = pooled_partly_trainable(model, torch.stack([v[0] for v in vb]), blocks)
    temb = None
    if teacher is not None:
        with torch.no_grad():
            temb = (teacher.embed(torch.stack([v[1] for v in va])), teacher.embed(torch.stack([v[1] for v in vb])))
    return _stage1_total(model, job, za, zp, temb, d)


def _stage2_inputs(model, job, images, cache, step, idx) -> tuple[torch.Tensor, ...]:
    """Pooled (anchor view at R_hi, positive view at R_lo, positive view at R_hi)."""
    t, spec = job.t, model.spec
    if cache is not None:
        pairs = [view_rng(t["seed"], 2, step, i).choice(cache.views, 2, replace=cache.views < 2) for i in idx]
        return (torch.stack([cache.hi[i, va] for i, (va, _) in zip(idx, pairs)]).float(),
                torch.stack([cache.lo[i, vb] for i, (_, vb) in zip(idx, pairs)]).float(),
                torch.stack([cache.hi[i, vb] for i, (_, vb) in zip(idx, pairs)]).float())
    with torch.no_grad():
        va = [same_view(images.images[i], view_rng(t["seed"], 2, step, i, 0), (spec.size_hi,),
                        t["augment_strength"], t["augmentations"], spec.resize, other_picker(images, i))[0]
              for i in idx]
        vb = [same_view(images.images[i], view_rng(t["seed"], 2, step, i, 1), (spec.size_hi, spec.size_lo),
                        t["augment_strength"], t["augmentations"], spec.resize, other_picker(images, i))
              for i in idx]
        return (model.pooled(torch.stack(va)), model.pooled(torch.stack([v[1] for v in vb])),
                model.pooled(torch.stack([v[0] for v in vb])))


def _loss_stage2(model, job, images, cache, step, idx, d: Dist) -> torch.Tensor:
    a_hi, p_lo, p_hi = _stage2_inputs(model, job, images, cache, step, idx)
    tau = float(job.t["temperature"])
    loss = info_nce(d.gather(model.coarse_gallery(a_hi)), d.gather(model.coarse_gallery(p_lo)), tau)
    if job.t["fine_head"]:
        loss = loss + info_nce(d.gather(model.fine(a_hi)), d.gather(model.fine(p_hi)), tau)
    return loss


def _loss_stage3(model, job, images, cache, step, idx, d: Dist) -> torch.Tensor:
    t, spec = job.t, model.spec
    if cache is not None:
        views = [int(view_rng(t["seed"], 3, step, i).integers(cache.views)) for i in idx]
        lo = torch.stack([cache.lo[i, v] for i, v in zip(idx, views)]).float()
        hi = torch.stack([cache.hi[i, v] for i, v in zip(idx, views)]).float()
    else:
        with torch.no_grad():
            pairs = [same_view(images.images[i], view_rng(t["seed"], 3, step, i), (spec.size_lo, spec.size_hi),
                               t["augment_strength"], t["augmentations"], spec.resize, other_picker(images, i))
                     for i in idx]
            lo = model.pooled(torch.stack([p[0] for p in pairs]))
            hi = model.pooled(torch.stack([p[1] for p in pairs]))
    with torch.no_grad():
        teacher = model.coarse_gallery(hi)
    # the loss is a mean over samples: gather so that every process holds the global mean
    return distill_loss(d.gather(model.coarse_query(lo)), d.gather(teacher))


LOSSES: dict[int, Callable[..., torch.Tensor]] = {1: _loss_stage1, 2: _loss_stage2, 3: _loss_stage3}


# ---------------------------------------------------------------------------------------------
# state, checkpoints, resume
def _ckpt_url(job: TrainJob, stage: int, step: int) -> str:
    return fsio.join(job.output, "checkpoints", f"stage{stage}-step{step:06d}")


def _read_state(job: TrainJob) -> dict | None:
    url = fsio.join(job.output, STATE)
    if not fsio.exists(url):
        return None
    try:
        state = fsio.read_json(url)
    except Exception as exc:
        raise TrainError(f"{url} is unreadable ({exc}); delete it or set train.resume=false") from None
    if state.get("job") != json.loads(json.dumps(job.fingerprint(), default=str)):
        old, new = state.get("job", {}), json.loads(json.dumps(job.fingerprint(), default=str))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise TrainError(f"{job.output} holds a training run with different settings ({', '.join(diff)}); "
                         "use a new --output, or set train.resume=false to start over there")
    return state


def _save(model: DescriptorModel, opt: torch.optim.Optimizer, job: TrainJob, state: dict, stage: int,
          step: int, images: ImageSet, stage_done: bool) -> None:
    base = _ckpt_url(job, stage, step)
    meta = save_checkpoint(model, base + ".pt", extra={"training": {"stage": stage, "step": step,
                                                                     "output": job.output}})
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    fsio.write_bytes(base + ".optim.pt", buf.getvalue())
    state["current"] = {"stage": stage, "step": step, "checkpoint": base + ".pt",
                        "optimizer": base + ".optim.pt", "model_version": meta["model_version"],
                        "stage_done": stage_done}
    card = card_mod.build_card(model, job, images, state, checkpoint=base + ".pt")
    fsio.write_json(base + ".card.json", card)
    fsio.write_json(fsio.join(job.output, STATE), state)  # LAST: the resume point
    log.info("checkpoint %s.pt (stage %d step %d, model_version %s)", base, stage, step, meta["model_version"])
    _prune(job, stage, int(job.t["keep_checkpoints"]))


def _prune(job: TrainJob, stage: int, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of ``stage`` (with their optimiser state and card)."""
    fs, root = fsio.url_to_fs(fsio.join(job.output, "checkpoints"))
    prefix = f"stage{stage}-step"
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    steps = sorted({n[len(prefix):len(prefix) + 6] for n in names if n.startswith(prefix) and n.endswith(".pt")})
    for old in steps[:-keep] if keep > 0 else []:
        for ext in (".pt", ".optim.pt", ".card.json"):
            path = f"{root}/{prefix}{old}{ext}"
            if fs.exists(path):
                fs.rm(path)


# ---------------------------------------------------------------------------------------------
def _threads(job: TrainJob, d: Dist) -> int:
    configured = int(job.t["threads"])
    if configured > 0:
        return configured
    return max(1, (os.cpu_count() or 1) // d.world)


def run_stage(model: DescriptorModel, job: TrainJob, images: ImageSet, stage: int, state: dict,
              d: Dist, cache: FeatureCache | None, teacher: Teacher | None = None) -> dict:
    t, sc = job.t, job.stage_cfg(stage)
    steps, base_lr = int(sc["steps"]), float(sc["lr"])
    names = trainable_names(model, stage, int(t["backbone_blocks"]), bool(t["fine_head"]))
    params = set_trainable(model, names)
    opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=float(t["weight_decay"]))
    start = 0
    losses: list[list[float]] = state.setdefault("losses", {}).setdefault(str(stage), [])
    cur = state.get("current") or {}
    if cur.get("stage") == stage:
        start = min(int(cur["step"]), steps)
        opt.load_state_dict(torch.load(io.BytesIO(fsio.read_bytes(cur["optimizer"])), weights_only=True))
        losses[:] = [x for x in losses if x[0] <= start]
        log.info("stage %d (%s): resuming after step %d of %d", stage, STAGES[stage], start, steps)
    if stage == 3 and start == 0 and sc.get("init", "adapter1") == "adapter1":
        model.adapter2_from_adapter1()  # distil from adapter 1's own function on R_lo inputs
    bsz = min(int(t["batch_size"]), len(images))
    bsz -= bsz % d.world
    if bsz < 2:
        raise TrainError(f"a batch of {bsz} cannot hold negatives: need at least 2 images per batch "
                         f"(images: {len(images)}, processes: {d.world})")
    per = bsz // d.world
    every = max(1, int(t["checkpoint_every"]))
    progress = Progress(f"train stage {stage} ({STAGES[stage]})", total=steps,
                        every=float(t["progress_seconds"]), unit="steps")
    progress.done = start
    t0 = time.monotonic()
    threads = torch.get_num_threads()
    if cache is not None:
        torch.set_num_threads(1)  # small tensors on cached features: extra threads mostly spin
    for step in range(start + 1, steps + 1):
        idx = batch_indices(int(t["seed"]), stage, step, len(images), bsz)[d.rank * per:(d.rank + 1) * per]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, base_lr)
        opt.zero_grad(set_to_none=True)
        loss = LOSSES[stage](model, job, images, cache, step, [int(i) for i in idx], d,
                             **({"teacher": teacher} if stage == 1 else {}))
        if not torch.isfinite(loss):
            raise TrainError(f"stage {stage} step {step}: loss is {loss.item()} (lower train.stage{stage}.lr)")
        loss.backward()
        d.sum_grads(params)
        opt.step()
        losses.append([step, round(float(loss.item()), 6)])
        recent = [x[1] for x in losses[-10:]]
        progress.label = (f"train stage {stage} ({STAGES[stage]}) loss {float(np.mean(recent)):.4f} "
                          f"lr {lr_at(step, steps, base_lr):.2e}")
        progress.update(1)
        if d.main and (step % every == 0 or step == steps):
            _save(model, opt, job, state, stage, step, images, stage_done=step == steps)
        d.barrier()
    progress.finish()
    torch.set_num_threads(threads)
    k = max(1, min(10, len(losses) // 4))  # first / final loss: means over k steps at each end
    first = [x[1] for x in losses[:k]]
    last = [x[1] for x in losses[-k:]]
    summary = {"stage": stage, "name": STAGES[stage], "steps": steps, "lr": base_lr, "batch_size": bsz,
               "processes": d.world, "trainable": names if stage != 1 else
               f"{len(names)} tensors: last {t['backbone_blocks'] or 'all'} backbone blocks + pool.p",
               "trainable_parameters": int(sum(p.numel() for p in params)),
               "first_loss": round(float(np.mean(first)), 6) if first else None,
               "final_loss": round(float(np.mean(last)), 6) if last else None,
               "seconds": round(time.monotonic() - t0, 1), "resumed_from": start or None}
    for p in model.parameters():
        p.requires_grad_(False)
    return summary


def run_training(job: TrainJob, d: Dist | None = None) -> dict:
    """Run the selected stages (``train.stages``) of ``job``; returns the final model card."""
    d = d or Dist()
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads(job, d))
    try:
        return _run_training(job, d)
    finally:
        torch.set_num_threads(threads)


def _run_training(job: TrainJob, d: Dist) -> dict:
    t = job.t
    torch.manual_seed(int(t["seed"]))
    if 1 in [int(s) for s in t["stages"]] and job.model_cfg["backbone"] in EXTERNAL_BACKBONES:
        raise _external_stage1(job.model_cfg["backbone"])   # before any work
    if d.main:
        fsio.ensure_writable(job.output)
    d.barrier()
    policy = DecodePolicy.from_config(job.preprocess_cfg)
    images = load_images(job.input, policy, int(t["max_side"]), job.input_format, job.key_column,
                         job.bytes_column)
    state = _read_state(job) if t["resume"] else None
    if state is None:
        state = {"job": json.loads(json.dumps(job.fingerprint(), default=str)), "completed": {},
                 "losses": {}, "data": images.summary(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                  time.gmtime())}
        model = model_from_config(job.model_cfg, job.preprocess_cfg)
    else:
        ckpt = (state.get("current") or {}).get("checkpoint")
        model = (load_checkpoint(ckpt, backbone_weights=job.model_cfg.get("backbone_weights")) if ckpt
                 else model_from_config(job.model_cfg, job.preprocess_cfg))
        log.info("resuming %s from %s (completed stages: %s)", job.output, ckpt,
                 sorted(state.get("completed", {})) or "none")
    state["processes"] = d.world
    stages = [int(s) for s in t["stages"]]
    if model.external and 1 in stages and "1" not in state["completed"]:
        raise _external_stage1(model.spec.backbone)   # e.g. model.checkpoint of an external backbone
    prefix: FeatureCache | None = None
    cache: FeatureCache | None = None
    blocks = int(t["backbone_blocks"])
    use_cache = int(t["cache_views"]) > 0
    teacher = None
    if t.get("teacher") and 1 in stages and "1" not in state["completed"]:
        teacher = load_teacher(t["teacher"], int(t["teacher_size"]), job.preprocess_cfg)
        state["teacher"] = {"url": teacher.url, "model_version": teacher.version, "size": teacher.size}
        log.info("stage 1 teacher %s (model_version %s, %d px)", teacher.url, teacher.version, teacher.size)
    for stage in stages:
        if str(stage) in state["completed"]:
            log.info("stage %d (%s) already complete: skipped", stage, STAGES[stage])
            continue
        if stage == 1 and use_cache and 0 < blocks < backbone_block_count(model):
            # the frozen leading blocks run once per cached view; stage 1 trains the last blocks on them
            prefix = build_cache(model, images, job, d, blocks, teacher=teacher)
            summary = run_stage(model, job, images, 1, state, d, prefix)
        elif stage == 1:
            summary = run_stage(model, job, images, 1, state, d, None, teacher)
        else:
            if use_cache and cache is None:
                cache = pooled_cache(model, prefix) if prefix is not None else build_cache(model, images, job, d)
            summary = run_stage(model, job, images, stage, state, d, cache)
        state["completed"][str(stage)] = summary
        if d.main:
            fsio.write_json(fsio.join(job.output, STATE), state)
        d.barrier()
    if {2, 3} & set(int(s) for s in state["completed"]):
        model.spec.heads = "trained"
    result: dict[str, Any] = {}
    if d.main:
        evaluation = None
        if t["eval_input"]:
            from retrieval.training.evaluate import evaluate_job

            evaluation = evaluate_job(model, job)
        final = fsio.join(job.output, "model.pt")
        model.spec.extra = {k: v for k, v in model.spec.extra.items() if k != "training"}
        save_checkpoint(model, final, extra={"training": {"output": job.output, "stages": sorted(
            state["completed"]), "data": images.summary()["fingerprint"]}})
        result = card_mod.build_card(model, job, images, state, checkpoint=final, evaluation=evaluation)
        card_mod.write_card(result, fsio.join(job.output, "model_card"))
        log.info("training done: %s (model_version %s)", final, result["model_version"])
    # every rank returns the card: TorchDistributor (local mode) keeps whichever process's return
    # value was written last, so a rank returning {} could win the race
    return d.broadcast_object(result if d.main else None)


def distributed_main(job_dict: dict) -> dict:
    """Entry point of each TorchDistributor process (module level: picklable by reference)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    d = Dist.from_env()
    try:
        return run_training(TrainJob(**job_dict), d)
    finally:
        d.close()


def run_distributed(job: TrainJob, processes: int, local_mode: bool = True, use_gpu: bool = False) -> dict:
    """The same training, data parallel over ``processes`` processes by Spark's TorchDistributor
    (gloo backend on CPU). Needs an active SparkSession."""
    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=processes, local_mode=local_mode, use_gpu=use_gpu)
    return distributor.run(distributed_main, asdict(job))
