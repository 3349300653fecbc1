"""The three training stages of the method (docs/method.md), resumable and data-parallel.

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

This module is the loop and the entry points; the pieces live by role in :mod:`.job` (settings),
:mod:`.trainable` (what each stage trains), :mod:`.losses`, :mod:`.teacher`, :mod:`.cache`,
:mod:`.steps` (one step of each stage) and :mod:`.saving` (state, checkpoints, resume).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from retrieval import fsio, outputs
from retrieval.engine import Engine, as_engine
from retrieval.model.checkpoints import load_checkpoint, model_from_config, save_checkpoint
from retrieval.model.network import EXTERNAL_BACKBONES, DescriptorModel, backbone_version
from retrieval.extract.preprocess import DecodePolicy
from retrieval.progress import Progress
from retrieval.train import card as card_mod
from retrieval.train.cache import FeatureCache, PooledCache, build_cache, pooled_cache, suffix_pooled
from retrieval.train.saving import STATE, read_state, write_checkpoint
from retrieval.train.data import ImageSet, load_images, view_rng
from retrieval.train.dist import Dist
from retrieval.train.job import STAGES, TrainError, TrainJob, external_stage1_error
from retrieval.train.losses import distill_loss, info_nce, koleo_loss, similarity_distill_loss
from retrieval.train.steps import LOSSES
from retrieval.train.teacher import Teacher, load_teacher
from retrieval.train.trainable import (backbone_block_count, pooled_partly_trainable, set_trainable,
                                          trainable_names)

log = logging.getLogger(__name__)

# the names this module has always offered (tests and callers use ``trainer.<name>``); they live in
# the modules above now
__all__ = ["STAGES", "STATE", "LOSSES", "TrainError", "TrainJob", "Teacher", "FeatureCache", "PooledCache",
           "backbone_block_count", "backbone_version", "trainable_names", "set_trainable",
           "pooled_partly_trainable", "suffix_pooled", "info_nce", "distill_loss", "koleo_loss",
           "similarity_distill_loss", "load_teacher", "build_cache", "pooled_cache", "lr_at", "batch_indices",
           "run_stage", "run_training", "distributed_main", "run_distributed"]


def lr_at(step: int, steps: int, base: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 5% of ``base``."""
    warm = max(1, steps // 20)
    if step <= warm:
        return base * step / warm
    t = (step - warm) / max(1, steps - warm)
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


def batch_indices(seed: int, stage: int, step: int, n: int, size: int) -> np.ndarray:
    return view_rng(seed, 1000 + stage, step).permutation(n)[:size]


def _torch_threads(job: TrainJob, d: Dist) -> int:
    configured = job.train_cfg["threads"]
    if configured != "auto" and int(configured) > 0:
        return int(configured)
    return max(1, (os.cpu_count() or 1) // d.world)


def run_stage(model: DescriptorModel, job: TrainJob, images: ImageSet, stage: int, state: dict,
              d: Dist, cache: FeatureCache | None, teacher: Teacher | None = None) -> dict:
    train_cfg, stage_cfg = job.train_cfg, job.stage_cfg(stage)
    steps, base_lr = int(stage_cfg["steps"]), float(stage_cfg["lr"])
    names = trainable_names(model, stage, int(train_cfg["backbone_blocks"]), bool(train_cfg["fine_head"]))
    params = set_trainable(model, names)
    opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=float(train_cfg["weight_decay"]))
    start = 0
    losses: list[list[float]] = state.setdefault("losses", {}).setdefault(str(stage), [])
    cur = state.get("current") or {}
    if cur.get("stage") == stage:
        start = min(int(cur["step"]), steps)
        opt.load_state_dict(torch.load(io.BytesIO(fsio.read_bytes(cur["optimizer"])), weights_only=True))
        losses[:] = [x for x in losses if x[0] <= start]
        log.info("stage %d (%s): resuming after step %d of %d", stage, STAGES[stage], start, steps)
    if stage == 3 and start == 0 and stage_cfg.get("init", "adapter1") == "adapter1":
        model.adapter2_from_adapter1()  # distil from adapter 1's own function on R_lo inputs
    bsz = min(int(train_cfg["batch_size"]), len(images))
    bsz -= bsz % d.world
    if bsz < 2:
        raise TrainError(f"a batch of {bsz} cannot hold negatives: need at least 2 images per batch "
                         f"(images: {len(images)}, processes: {d.world})")
    per = bsz // d.world
    every = max(1, int(train_cfg["checkpoint_every"]))
    progress = Progress(f"train stage {stage} ({STAGES[stage]})", total=steps,
                        every=float(train_cfg["progress_seconds"]), unit="steps")
    progress.done = start
    t0 = time.monotonic()
    threads = torch.get_num_threads()
    if cache is not None:
        torch.set_num_threads(1)  # small tensors on cached features: extra threads mostly spin
    for step in range(start + 1, steps + 1):
        idx = batch_indices(int(train_cfg["seed"]), stage, step, len(images), bsz)[d.rank * per:(d.rank + 1) * per]
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
            write_checkpoint(model, opt, job, state, stage, step, images, stage_done=step == steps)
        d.barrier()
    progress.finish()
    torch.set_num_threads(threads)
    k = max(1, min(10, len(losses) // 4))  # first / final loss: means over k steps at each end
    first = [x[1] for x in losses[:k]]
    last = [x[1] for x in losses[-k:]]
    summary = {"stage": stage, "name": STAGES[stage], "steps": steps, "lr": base_lr, "batch_size": bsz,
               "processes": d.world, "trainable": names if stage != 1 else
               f"{len(names)} tensors: last {train_cfg['backbone_blocks'] or 'all'} backbone blocks + pool.p",
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
    torch.set_num_threads(_torch_threads(job, d))
    try:
        return _run_training(job, d)
    finally:
        torch.set_num_threads(threads)


def _run_training(job: TrainJob, d: Dist) -> dict:
    train_cfg = job.train_cfg
    torch.manual_seed(int(train_cfg["seed"]))
    if 1 in [int(s) for s in train_cfg["stages"]] and job.model_cfg["backbone"] in EXTERNAL_BACKBONES:
        raise external_stage1_error(job.model_cfg["backbone"])   # before any work
    if d.main:
        fsio.ensure_writable(job.output)
        outputs.begin(job.output)          # incomplete until the marker is rewritten
    d.barrier()
    policy = DecodePolicy.from_config(job.preprocess_cfg)
    images = load_images(job.input, policy, int(train_cfg["max_side"]), job.input_format, job.key_column,
                         job.bytes_column)
    state = read_state(job) if train_cfg["resume"] else None
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
    stages = [int(s) for s in train_cfg["stages"]]
    if model.external and 1 in stages and "1" not in state["completed"]:
        raise external_stage1_error(model.spec.backbone)   # e.g. model.checkpoint of an external backbone
    prefix: FeatureCache | None = None
    cache: FeatureCache | None = None
    blocks = int(train_cfg["backbone_blocks"])
    use_cache = int(train_cfg["cache_views"]) > 0
    teacher = None
    if train_cfg.get("teacher") and 1 in stages and "1" not in state["completed"]:
        teacher = load_teacher(train_cfg["teacher"], int(train_cfg["teacher_size"]), job.preprocess_cfg)
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
        if train_cfg["eval_input"]:
            from retrieval.train.validation import evaluate_job

            evaluation = evaluate_job(model, job)
        final = fsio.join(job.output, "model.pt")
        model.spec.extra = {k: v for k, v in model.spec.extra.items() if k != "training"}
        save_checkpoint(model, final, extra={"training": {"output": job.output, "stages": sorted(
            state["completed"]), "data": images.summary()["fingerprint"]}})
        result = card_mod.build_card(model, job, images, state, checkpoint=final, evaluation=evaluation)
        card_mod.write_card(result, fsio.join(job.output, "model_card"))
        outputs.commit(job.output, "train", {
            "output": job.output, "model_version": result["model_version"], "checkpoint": final,
            "stages": sorted(state["completed"]), "engine": "spark" if d.world > 1 else "local",
            "files": outputs.file_entries(job.output, ["model.pt", "model_card.json", "model_card.md"])})
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


def run_distributed(engine: Engine | Any, job: TrainJob, processes: int, local_mode: bool = True,
                    use_gpu: bool = False) -> dict:
    """The same training, data parallel over ``processes`` processes (gloo backend on CPU) by the
    engine: Spark's TorchDistributor (the local engine refuses more than one process)."""
    return as_engine(engine).run_torch(distributed_main, processes, asdict(job), local_mode=local_mode, use_gpu=use_gpu)
