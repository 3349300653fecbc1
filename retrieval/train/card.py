"""Model cards: what a checkpoint is, what made it, and how good it is (JSON + Markdown)."""
from __future__ import annotations

import time
from typing import Any

from retrieval import fsio


def build_card(model, job, images, state: dict, checkpoint: str,
               evaluation: dict | None = None) -> dict[str, Any]:
    train_cfg = job.train_cfg
    losses = state.get("losses", {})
    stages = {}
    for s in sorted({*state.get("completed", {}), *losses}):
        done = state.get("completed", {}).get(s)
        curve = losses.get(s, [])
        stages[s] = done or {"stage": int(s), "steps": job.train_cfg[f"stage{s}"]["steps"],
                             "steps_done": curve[-1][0] if curve else 0,
                             "final_loss": curve[-1][1] if curve else None, "complete": False}
        # a loss curve thinned to at most 50 points, for the card
        stride = max(1, len(curve) // 50)
        stages[s] = {**stages[s], "loss_curve": curve[::stride] + ([curve[-1]] if curve and
                                                                    (len(curve) - 1) % stride else [])}
    return {
        "model_version": model.model_version(),
        "checkpoint": checkpoint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {k: v for k, v in model.metadata().items() if k not in ("extra", "model_version")},
        "base": {"backbone": job.model_cfg["backbone"], "backbone_weights": job.model_cfg["backbone_weights"],
                 "start_checkpoint": job.model_cfg.get("checkpoint"), "head_seed": job.model_cfg["head_seed"]},
        "data": state.get("data") or images.summary(),
        "augmentations": {"ops": list(train_cfg["augmentations"]), "strength": train_cfg["augment_strength"]},
        "schedule": {"stages_selected": list(train_cfg["stages"]), "seed": train_cfg["seed"],
                     "batch_size": train_cfg["batch_size"],
                     "temperature": train_cfg["temperature"], "backbone_blocks": train_cfg["backbone_blocks"],
                     "fine_head": train_cfg["fine_head"], "cache_views": train_cfg["cache_views"],
                     "processes": state.get("processes", 1)},
        "stages": stages,
        "evaluation": evaluation,
        "train_config": train_cfg,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def to_markdown(card: dict) -> str:
    lines = [f"# Model card: {card['model_version']}", "",
             f"- checkpoint: `{card['checkpoint']}`", f"- created: {card['created']}",
             f"- backbone: {card['model']['backbone']} ({card['base']['backbone_weights']} weights), "
             f"heads: {card['model']['heads']}, fine {card['model']['fine_dim']}-d, "
             f"coarse {card['model']['coarse_dim']}-d, R_hi {card['model']['size_hi']} / R_lo "
             f"{card['model']['size_lo']} ({card['model']['resize']})",
             f"- data: `{card['data']['input']}`: {card['data']['images']} images "
             f"({card['data']['errors']} skipped), fingerprint {card['data']['fingerprint']}",
             f"- augmentations (strength {card['augmentations']['strength']}): "
             f"{', '.join(card['augmentations']['ops'])}",
             f"- seed {card['schedule']['seed']}, global batch {card['schedule']['batch_size']}, "
             f"temperature {card['schedule']['temperature']}, processes {card['schedule']['processes']}",
             "", "## Stages", "", "| stage | steps | lr | trainable params | first loss | final loss | seconds |",
             "|---|---|---|---|---|---|---|"]
    for s, st in card["stages"].items():
        lines.append(f"| {s} {st.get('name', '')} | {st.get('steps')} | {_fmt(st.get('lr'))} | "
                     f"{st.get('trainable_parameters', '')} | {_fmt(st.get('first_loss'))} | "
                     f"{_fmt(st.get('final_loss'))} | {_fmt(st.get('seconds'))} |")
    ev = card.get("evaluation")
    lines += ["", "## Evaluation", ""]
    if not ev:
        lines.append("No evaluation (set `train.eval_input` to held-out images).")
    else:
        lines.append(f"Held-out data: {ev.get('data', '')}")
        lines += ["", "| metric | " + " | ".join(ev["models"]) + " |",
                  "|---|" + "---|" * len(ev["models"])]
        keys = list(next(iter(ev["models"].values())))
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(_fmt(m.get(k)) for m in ev["models"].values()) + " |")
    return "\n".join(lines) + "\n"


def write_card(card: dict, base_url: str) -> None:
    """``<base>.json`` and ``<base>.md``."""
    fsio.write_json(base_url + ".json", card)
    fsio.write_bytes(base_url + ".md", to_markdown(card).encode())
