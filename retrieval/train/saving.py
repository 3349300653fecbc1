"""Training state, checkpoints and resume: ``checkpoints/stage<S>-step<NNNNNN>.*`` and ``_train_state.json``."""
from __future__ import annotations

import io
import json
import logging

import torch

from retrieval import fsio
from retrieval.model.checkpoints import save_checkpoint
from retrieval.model.network import DescriptorModel
from retrieval.train import card as card_mod
from retrieval.train.data import ImageSet
from retrieval.train.job import TrainError, TrainJob

log = logging.getLogger(__name__)

STATE = "_train_state.json"


def _ckpt_url(job: TrainJob, stage: int, step: int) -> str:
    return fsio.join(job.output, "checkpoints", f"stage{stage}-step{step:06d}")


def read_state(job: TrainJob) -> dict | None:
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


def write_checkpoint(model: DescriptorModel, opt: torch.optim.Optimizer, job: TrainJob, state: dict, stage: int,
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
    _prune(job, stage, int(job.train_cfg["keep_checkpoints"]))


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
