"""Held-out evaluation of descriptor models: the acceptance figures of the training issue.

On a gallery of held-out photos (encoded at R_hi: adapter 1 + fine head) and queries that are
copies of them plus non-matching images (encoded on the query path: R_lo -> adapter 2 for the coarse
code, R_hi -> fine head), with numpy only:

- ``coarse_recall@1_asym`` / ``coarse_recall@1_sym``: coarse stage alone, query coarse code from R_lo
  via adapter 2 (the patent's asymmetric path) vs from R_hi via adapter 1 (symmetric);
- ``shortlist_recall``: the true image is in the coarse top-``shortlist``;
- ``recall@1`` and ``micro_ap``: the two-stage search (coarse top-``shortlist``, then fine rerank);
  micro-AP as in the 2021 Image Similarity Challenge (:mod:`retrieval.metrics`, the same code as
  ``retrieval evaluate``): every (query, shortlisted image, fine score) is a prediction, ranked
  globally (ties: wrong predictions first); recall is over the queries that have a true match
  (NaN when none has);
- ``stage3_cos_*``: mean cosine between adapter2(pooled R_lo) and adapter1(pooled R_hi) of the same
  picture (the clean held-out photos, and the copies);
- timing: the query coarse encoding (R_lo, backbone + GeM + adapter 2) against the symmetric one
  (R_hi, backbone + GeM + adapter 1), wall-clock per image and FLOPs (torch's FlopCounterMode).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from PIL import Image

from retrieval.model.network import DescriptorModel, backbone_version
from retrieval.extract.preprocess import resize, to_tensor
from retrieval.metrics import micro_ap, precision_recall
from retrieval.train.augment import OPS, augment
from retrieval.train.data import ImageSet, load_images, view_rng

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    gallery: list[Image.Image]
    gallery_ids: list[str]
    queries: list[Image.Image]
    query_ids: list[str]
    truth: np.ndarray          # per query: index into gallery, or -1 (no true match)
    description: str = ""


def copies_eval_set(images: ImageSet, copies: int = 2, seed: int = 12345, strength: float = 0.6,
                    distractor_fraction: float = 0.25) -> EvalSet:
    """Gallery = most of ``images``; queries = ``copies`` augmented copies of every image, where the
    copies of the held-back ``distractor_fraction`` have no true match in the gallery."""
    n = len(images)
    order = view_rng(seed, 77).permutation(n)
    n_out = int(round(n * distractor_fraction)) if n > 2 else 0
    out, keep = sorted(order[:n_out].tolist()), sorted(order[n_out:].tolist())
    gal = {img_idx: g for g, img_idx in enumerate(keep)}
    queries, qids, truth = [], [], []
    for i in keep + out:
        for c in range(copies):
            queries.append(augment(images.images[i], view_rng(seed, 78, i, c), strength, OPS))
            qids.append(f"copy_{c}_{images.ids[i]}")
            truth.append(gal.get(i, -1))
    return EvalSet([images.images[i] for i in keep], [images.ids[i] for i in keep], queries, qids,
                   np.array(truth, np.int64),
                   f"{images.source}: {len(keep)} gallery images, {len(queries)} queries "
                   f"({copies} augmented copies each at strength {strength}, seed {seed}; copies of "
                   f"{len(out)} images not in the gallery are non-matching)")


@torch.no_grad()
def pooled_features(model: DescriptorModel, images: list[Image.Image], size: int, batch: int = 32) -> torch.Tensor:
    out = []
    for k in range(0, len(images), batch):
        x = torch.stack([to_tensor(resize(im, size, model.spec.resize)) for im in images[k:k + batch]])
        out.append(model.pooled(x))
    return torch.cat(out)


@torch.no_grad()
def head_metrics(model: DescriptorModel, pooled: Mapping[str, torch.Tensor], truth: np.ndarray,
                 shortlist: int) -> dict:
    """Retrieval metrics of ``model``'s heads on precomputed pooled features
    (``g_hi``, ``g_lo``, ``q_hi``, ``q_lo``)."""
    g_coarse = model.coarse_gallery(pooled["g_hi"]).numpy()
    g_fine = model.fine(pooled["g_hi"]).numpy()
    q_asym = model.coarse_query(pooled["q_lo"]).numpy()
    q_sym = model.coarse_gallery(pooled["q_hi"]).numpy()
    q_fine = model.fine(pooled["q_hi"]).numpy()
    has = truth >= 0
    k = max(1, min(shortlist, len(g_coarse)))
    s_asym, s_sym = q_asym @ g_coarse.T, q_sym @ g_coarse.T
    cand = np.argsort(-s_asym, axis=1, kind="stable")[:, :k]
    fine_scores = np.einsum("qd,qkd->qk", q_fine, g_fine[cand])
    rerank = np.argsort(-fine_scores, axis=1, kind="stable")
    top1 = cand[np.arange(len(cand)), rerank[:, 0]]
    correct = cand == truth[:, None]
    n_matching = int(has.sum())   # one true gallery image per matching query
    precisions, recalls, _ = precision_recall(fine_scores.ravel(), correct.ravel(), n_matching)
    cos_g = (model.coarse_query(pooled["g_lo"]) * model.coarse_gallery(pooled["g_hi"])).sum(-1)
    cos_q = (model.coarse_query(pooled["q_lo"]) * model.coarse_gallery(pooled["q_hi"])).sum(-1)
    return {
        "recall@1": float((top1[has] == truth[has]).mean()),
        # no query with a true match: undefined (NaN), like the recalls beside it
        "micro_ap": micro_ap(precisions, recalls) if n_matching else float("nan"),
        "coarse_recall@1_asym": float((s_asym.argmax(1)[has] == truth[has]).mean()),
        "coarse_recall@1_sym": float((s_sym.argmax(1)[has] == truth[has]).mean()),
        "shortlist_recall": float(correct[has].any(1).mean()),
        "shortlist": k,
        "stage3_cos_clean": float(cos_g.mean()),
        "stage3_cos_copies": float(cos_q.mean()),
    }


def _flops(fn, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops() / len(x)


@torch.no_grad()
def coarse_query_cost(model: DescriptorModel, images: list[Image.Image], repeats: int = 5,
                      batch: int = 16) -> dict:
    """Per-image cost of the query's coarse code: asymmetric (R_lo, adapter 2) vs symmetric
    (R_hi, adapter 1); best of ``repeats`` interleaved timings of one batch."""
    s = model.spec
    imgs = (images * (batch // max(1, len(images)) + 1))[:batch]
    x_lo = torch.stack([to_tensor(resize(im, s.size_lo, s.resize)) for im in imgs])
    x_hi = torch.stack([to_tensor(resize(im, s.size_hi, s.resize)) for im in imgs])

    def asym(x):
        return model.coarse_query(model.pooled(x))

    def sym(x):
        return model.coarse_gallery(model.pooled(x))

    asym(x_lo), sym(x_hi)  # warm-up
    t_asym, t_sym = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        asym(x_lo)
        t_asym.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sym(x_hi)
        t_sym.append(time.perf_counter() - t0)
    f_asym, f_sym = _flops(asym, x_lo[:2]), _flops(sym, x_hi[:2])
    return {"asym_ms_per_image": 1000 * min(t_asym) / batch, "sym_ms_per_image": 1000 * min(t_sym) / batch,
            "time_ratio": min(t_asym) / min(t_sym), "asym_gflops": f_asym / 1e9, "sym_gflops": f_sym / 1e9,
            "flops_ratio": f_asym / f_sym, "threads": torch.get_num_threads(),
            "sizes": [s.size_lo, s.size_hi]}


def _same_trunk(a: DescriptorModel, b: DescriptorModel) -> bool:
    return backbone_version(a) == backbone_version(b)


def evaluate_models(models: Mapping[str, DescriptorModel], evalset: EvalSet, shortlist: int = 5,
                    timing: bool = True) -> dict:
    """Metrics of every model on one eval set (pooled features shared between models that have the
    same backbone), plus the coarse-encoding cost of the first model."""
    results: dict[str, dict] = {}
    cached: list[tuple[DescriptorModel, dict]] = []
    t0 = time.monotonic()
    for name, model in models.items():
        model.eval()
        pooled = next((p for m, p in cached if _same_trunk(m, model)), None)
        if pooled is None:
            s = model.spec
            pooled = {"g_hi": pooled_features(model, evalset.gallery, s.size_hi),
                      "g_lo": pooled_features(model, evalset.gallery, s.size_lo),
                      "q_hi": pooled_features(model, evalset.queries, s.size_hi),
                      "q_lo": pooled_features(model, evalset.queries, s.size_lo)}
            cached.append((model, pooled))
        results[name] = {"model_version": model.model_version(),
                         **head_metrics(model, pooled, evalset.truth, shortlist)}
    out = {"data": evalset.description, "gallery": len(evalset.gallery), "queries": len(evalset.queries),
           "matching_queries": int((evalset.truth >= 0).sum()), "models": results,
           "seconds": round(time.monotonic() - t0, 1)}
    if timing:
        out["query_coarse_cost"] = coarse_query_cost(next(iter(models.values())), evalset.queries)
    return out


def evaluate_job(model: DescriptorModel, job) -> dict:
    """The model card's evaluation: the trained model vs the model the job started from, on copies
    of the held-out images in ``train.eval_input``."""
    from retrieval.model.checkpoints import model_from_config
    from retrieval.extract.preprocess import DecodePolicy

    train_cfg = job.train_cfg
    images = load_images(train_cfg["eval_input"], DecodePolicy.from_config(job.preprocess_cfg), 512)
    evalset = copies_eval_set(images, copies=int(train_cfg["eval_copies"]), seed=int(train_cfg["seed"]) + 12345)
    start = model_from_config(job.model_cfg, job.preprocess_cfg)
    result = evaluate_models({"trained": model, "start": start}, evalset, int(train_cfg["eval_shortlist"]))
    log.info("evaluation: %s", {k: {m: round(v, 4) for m, v in r.items() if isinstance(v, float)}
                                for k, r in result["models"].items()})
    return result
