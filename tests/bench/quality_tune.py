"""``bench_quality.py --tune``: the quality levers searched together on the tune split (issue 23).

Features are computed once per image through the library (the pooled base features of the
gallery, the background photos, and the queries with every region of ``--regions``; the decode,
crops and forward of ``retrieval extract``); every variant is then scored by exact 512-d search of
the fine descriptors, merged per (query, gallery image) as the search merges query regions
(:func:`retrieval.search.regions.merge`), normalised as ``search.normalize`` does. The levers:

- ``fit``: none, or the whitening fitted on the gallery (``retrieval.fit.job.fit_model``: the code
  of ``retrieval fit``) for each ``fit.shrinkage`` x ``fit.power`` x ``fit.background_share`` (the
  background photos joining the fit) x ``fit.prior_share`` (the shipped model's own whitening
  statistics joining it) x ``fit.dim``;
- normalisation: ``search.normalize.k`` x ``beta`` (off: the raw cosine);
- the query region set (subsets of the extracted regions) and the merge's ``search.region_margin``
  (a region's merge key minus this: the whole image wins near-ties).

Figures: micro-AP, recall@1, recall@10 and the worst kind's recall@1 (kinds with >= 10 copies).
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import time

import numpy as np

from retrieval import config as config_mod
from retrieval.evaluate import evaluate_results

K = 10
MIN_KIND = 10       # worst kind: among the kinds with at least this many copies


def _listing(d: str) -> list[tuple[str, str]]:
    return sorted((f, os.path.join(d, f)) for f in os.listdir(d))


def encode(model_sets: list[str], rows: list[tuple[str, str]], regions: list[str], lo: bool):
    """``(ids, labels, pooled R_hi, pooled R_lo or None)`` of every row (regions after their image)."""
    import torch

    from retrieval.extract.preprocess import DecodePolicy, prepare_items
    from retrieval.model.checkpoints import model_from_config

    cfg = config_mod.load(sets=model_sets)
    model = model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict())
    spec = model.spec
    ids, labels, his, los, batch = [], [], [], [], []

    def flush() -> None:
        if batch:
            with torch.inference_mode():
                his.append(model.pooled(torch.stack([t[0] for t in batch])).float())
                if lo:
                    los.append(model.pooled(torch.stack([t[1] for t in batch])).float())
            batch.clear()

    for image_id, _, tensors, _, _, err in prepare_items(rows, (spec.size_hi, spec.size_lo), spec.resize,
                                                         DecodePolicy.from_config(cfg["preprocess"].to_dict()),
                                                         workers=2, ahead=64, regions=regions):
        if err is not None:
            raise SystemExit(f"{image_id}: {err}")
        for label, ts in (tensors if regions else [(None, tensors)]):
            ids.append(image_id)
            labels.append(label)
            batch.append(ts)
            if len(batch) >= 32:
                flush()
    flush()
    return ids, labels, torch.cat(his), (torch.cat(los) if lo else None)


def features(data: str, split: str, model_sets: list[str], regions: list[str], work: str, name: str) -> dict:
    import torch

    cache = os.path.join(work, f"tune-{split}-{name}-{'_'.join(regions) or 'whole'}.pt")
    if os.path.exists(cache):
        return torch.load(cache)
    t0 = time.monotonic()
    sd = os.path.join(data, split)
    g = encode(model_sets, _listing(os.path.join(sd, "gallery")), [], True)
    b = encode(model_sets, _listing(os.path.join(data, "background")), [], False)
    q = encode(model_sets, _listing(os.path.join(sd, "queries")), regions, False)
    out = {"g_ids": g[0], "g_hi": g[2], "g_lo": g[3], "b_hi": b[2], "q_ids": q[0], "q_labels": q[1], "q_hi": q[2]}
    torch.save(out, cache)
    print(f"[{name}] pooled features: {len(g[0])} gallery, {len(b[0])} background, {len(q[0])} query rows "
          f"({len(set(q[0]))} images) in {time.monotonic() - t0:.0f}s", flush=True)
    return out


def fitted(model, f: dict, fc: dict | None, dim: int | None = None):
    """A copy of ``model`` with the fit of ``fc`` (None: the model itself); ``dim``: the fine
    whitening keeps its top ``dim`` directions only."""
    import torch

    from retrieval.fit.job import fit_model

    m = copy.deepcopy(model)
    if fc is not None:
        fit_model(m, f["g_hi"], f["g_lo"], fc, extra_hi=f["b_hi"] if fc["background_share"] > 0 else None)
    if dim:
        with torch.no_grad():
            m.fine_white.weight[dim:] = 0
            m.fine_white.bias[dim:] = 0
    return m


def fine(m, x) -> np.ndarray:
    import torch

    with torch.no_grad():
        return m.fine(x).numpy()


class Scorer:
    """Exact search of query rows against the gallery; merged per image as the search merges."""

    def __init__(self, f: dict, truth) -> None:
        self.f, self.truth = f, truth
        self.names = np.array([(lab or "").split(":")[0] for lab in f["q_labels"]])
        self.qids = np.array(f["q_ids"])
        self.gids = np.array(f["g_ids"])

    def features(self, m) -> None:
        self.g, self.q, self.b = fine(m, self.f["g_hi"]), fine(m, self.f["q_hi"]), fine(m, self.f["b_hi"])
        s = self.q @ self.g.T
        self.top = np.argsort(-s, axis=1)[:, :K]
        self.sc = np.take_along_axis(s, self.top, axis=1)
        self.levels: dict[int, np.ndarray] = {}

    def level(self, k: int) -> np.ndarray:
        from retrieval.search.normalize import background_level

        if k not in self.levels:
            self.levels[k] = background_level(self.q, self.b, k)
        return self.levels[k]

    def score(self, regions: tuple[str, ...], norm: tuple[int, float] | None, margin: float = 0.0) -> dict:
        from retrieval.search.regions import merge, take

        keep = np.flatnonzero((self.names == "") | np.isin(self.names, regions))
        sc, top = self.sc[keep], self.top[keep]
        key = sc - norm[1] * self.level(norm[0])[keep][:, None] if norm else sc
        key = key - margin * (self.names[keep] != "")[:, None]
        starts = np.flatnonzero(self.names[keep] == "")
        ids, row, col = merge(starts, sc, top, key, K)
        val = take(key, row, col, np.nan)
        r, c = np.nonzero(ids >= 0)
        qid = self.qids[keep][starts]
        m, _ = evaluate_results(qid[r].tolist(), (c + 1).tolist(), self.gids[ids[r, c]].tolist(), val[r, c].tolist(),
                                self.truth, (1, 10), (0.5,), (0.9,))
        kinds = {k: v for k, v in m.get("per_kind", {}).items() if v["queries"] >= MIN_KIND}
        worst = min(kinds, key=lambda k: kinds[k]["recall@1"]) if kinds else None
        return {"micro_ap": m["micro_ap"], "recall@1": m["recall@1"], "recall@10": m["recall@10"],
                "worst": worst, "worst@1": kinds[worst]["recall@1"] if worst else None,
                "per_kind": m.get("per_kind", {}), "rows": round(len(keep) / len(starts), 2)}


def _line(label: str, r: dict) -> str:
    return (f"{label}: uAP {r['micro_ap']:.4f} r@1 {r['recall@1']:.4f} r@10 {r['recall@10']:.4f} "
            f"worst {r['worst']} {r['worst@1']:.3f} ({r['rows']} rows/q)")


def region_sets(names: list[str]) -> list[tuple[str, ...]]:
    return [()] + [c for n in range(1, len(names) + 1) for c in itertools.combinations(names, n)]


def tune(data: str, model_sets: list[str], name: str, work: str, regions: list[str], truth, edits) -> list[dict]:
    """Every lever on the tune split; returns the rows (also written to ``work``/tune-NAME.json)."""
    from retrieval.model.checkpoints import model_from_config

    os.makedirs(work, exist_ok=True)
    truth.kinds = {q: set(k) for q, k in edits.items() if q in truth.matches}
    f = features(data, "tune", model_sets, regions, work, name)
    cfg = config_mod.load(sets=model_sets)
    model = model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict())
    sc = Scorer(f, truth)
    base_fit = {**cfg["fit"].to_dict(), "adapter2_steps": 0}
    norm0 = (int(cfg["search.normalize.k"]), float(cfg["search.normalize.beta"]))
    current = tuple(cfg["extract.query_regions"])
    out: list[dict] = []

    def record(fit_label: str, regs, norm, margin: float, r: dict) -> None:
        out.append({"fit": fit_label, "regions": list(regs), "norm": norm, "margin": margin,
                    **{k: v for k, v in r.items() if k != "per_kind"}})
        print(_line(f"[{name}] {fit_label} | regions {'+'.join(regs) or 'none'} | norm {norm} | margin {margin}", r),
              flush=True)

    # 1. fit variants, with the current regions and normalisation (and without regions)
    fits = [("raw", None, None)]
    for share, prior, shrink, power in itertools.product((0.0, 0.5), (0.0, 0.5, 0.8), (0.2, 0.5), (0.25, 0.35, 0.5)):
        fits.append((f"fit share {share} prior {prior} shrink {shrink} power {power}",
                     {**base_fit, "background_share": share, "prior_share": prior, "shrinkage": shrink, "power": power},
                     None))
    for dim in (128, 256):
        fits.append((f"fit share 0.0 prior 0.0 shrink 0.2 power 0.5 dim {dim}",
                     {**base_fit, "background_share": 0.0, "prior_share": 0.0, "shrinkage": 0.2, "power": 0.5}, dim))
    for label, fc, dim in fits:
        sc.features(fitted(model, f, fc, dim))
        for regs in ((), current):
            record(label, regs, norm0, 0.0, sc.score(regs, norm0))
    # 2. for the raw model and the best fits: region sets x normalisation x margin
    ranked = sorted([r for r in out if r["regions"] == list(current) and r["fit"] != "raw"],
                    key=lambda r: -(r["micro_ap"] + r["recall@1"]))
    keep = ["raw"] + [r["fit"] for r in ranked[:3]]
    for label, fc, dim in fits:
        if label not in keep:
            continue
        sc.features(fitted(model, f, fc, dim))
        for regs in region_sets(regions):
            for norm in [None] + [(k, b) for k in (3, 10, 30) for b in (0.5, 0.75, 1.0)]:
                for margin in (0.0, 0.02, 0.05):
                    if norm is None and margin:
                        continue
                    record(label, regs, norm, margin, sc.score(regs, norm, margin))
    with open(os.path.join(work, f"tune-{name}.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    return out
