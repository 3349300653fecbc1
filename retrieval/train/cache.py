"""Feature caches: the frozen part of the network runs once per cached view (``train.cache_views``)."""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import torch

from retrieval import fsio
from retrieval.model.network import DescriptorModel, backbone_version
from retrieval.progress import Progress
from retrieval.train.data import ImageSet, other_picker, same_view, view_rng
from retrieval.train.dist import Dist
from retrieval.train.job import TrainJob
from retrieval.train.teacher import Teacher
from retrieval.train.trainable import backbone_block_count

log = logging.getLogger(__name__)

CACHE_KEY = 9  # view-key namespace of the cached views


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
    train_cfg = job.train_cfg
    ops_key = hashlib.sha256(",".join(train_cfg["augmentations"]).encode()).hexdigest()[:8]
    return (f"{images.fingerprint()}-v{int(train_cfg['cache_views'])}-s{train_cfg['augment_strength']}"
            f"-a{ops_key}-seed{train_cfg['seed']}")


@torch.no_grad()
def build_cache(model: DescriptorModel, images: ImageSet, job: TrainJob, d: Dist, blocks: int = 0,
                chunk: int = 32, teacher: Teacher | None = None) -> FeatureCache:
    """The cached views' features (``blocks`` > 0: activations entering the last ``blocks`` blocks;
    else pooled); with ``teacher``, also the teacher's embedding of every view (its own cache file:
    the student's cache is the one a run without a teacher writes)."""
    train_cfg, spec = job.train_cfg, model.spec
    n_views = int(train_cfg["cache_views"])
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
                        every=float(train_cfg["progress_seconds"]), unit="views")
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
            strength = 0.0 if v == 0 else float(train_cfg["augment_strength"])
            views = same_view(images.images[i], view_rng(train_cfg["seed"], CACHE_KEY, i, v), sizes, strength,
                              train_cfg["augmentations"], spec.resize, other_picker(images, i))
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
