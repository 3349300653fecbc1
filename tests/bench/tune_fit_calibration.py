"""Which ``retrieval fit`` keeps the false-match rates calibrated, and what it does to quality
(issue 22 item 3 with fit; issue 23 item 3).

    .venv/bin/python tests/bench/tune_fit_calibration.py --data /work/quality_data [--work /tmp/tune_fit_cal]
        [--split tune|test] [--variants all|NAME,...] [--background data|shipped]

Features are computed once per image through the library (the pooled base features of
``retrieval fit``, cached in ``--work``); then, per variant, the fine whitening is fitted exactly as
``retrieval fit`` fits it (:func:`retrieval.fit.whiten.fit_whitening` on the L2-normalised fine-head
outputs) on the variant's fit set, every image's fine descriptor recomputed, and the search is
simulated by exact 512-d search (top ``search.k`` = 10 per query, ``norm_score`` against the
background with k = 10, beta = 0.5, as the defaults). The false-match estimate is the search's own
(:mod:`retrieval.search.calibrate`: null = queries x background, leave-one-out level).

Variants: ``raw`` (no fit), ``gallery`` (whitening on the gallery alone), ``bg25`` / ``bg40`` /
``bg50`` (on the gallery and the background together, the background carrying 25 / 40 / 50% of the
weight: ``fit.background`` with ``fit.background_share``), ``concat`` (together, every image
weighted alike), each with a shrinkage x power grid.

Printed per variant: µAP, recall@1, the best 90%-precision recall; per target T in 0.1, 0.01, 0.001:
the threshold, estimated ``fmr`` per comparison there and the observed per-comparison rate of the
non-matching queries against the gallery (ratio est/obs), non-matching queries flagged; and the
default-threshold grid (precision, recall / P90 recall) with the T the documented rule picks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_quality as bq  # noqa: E402  (puts the repository on sys.path)

from retrieval.evaluate import evaluate_results  # noqa: E402
from retrieval.metrics import read_truth  # noqa: E402
from retrieval.search import calibrate  # noqa: E402
from retrieval.search.normalize import background_level  # noqa: E402

GRID = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 3e-4, 1e-4)
TARGETS = (0.1, 0.01, 0.001)
K, BETA, TOPK = 10, 0.5, 10
SHIPPED = os.path.join(bq.ROOT, "retrieval", "assets", "background")


def pooled(name: str, folder: str, work: str):
    """``(ids, pooled R_hi)`` of every image in ``folder`` (cached)."""
    import torch

    cache = os.path.join(work, f"pooled-{name}.pt")
    if os.path.exists(cache):
        return torch.load(cache)
    t0 = time.monotonic()
    listing = [x for x in bq._listing(folder) if x[0].lower().endswith((".jpg", ".jpeg", ".png"))]
    _, _, ids, hi, _ = bq._pooled([], listing)
    torch.save((ids, hi), cache)
    print(f"pooled {name}: {len(ids)} images in {time.monotonic() - t0:.0f}s", flush=True)
    return ids, hi


class Model:
    """The default model's fine path, with its whitening replaceable."""

    def __init__(self) -> None:
        from retrieval import config as config_mod
        from retrieval.model.checkpoints import model_from_config

        cfg = config_mod.load()
        self.model = model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict())

    def pre(self, hi) -> np.ndarray:
        """The L2-normalised fine-head output (what fit whitens)."""
        import torch

        with torch.no_grad():
            return torch.nn.functional.normalize(self.model.fine_head(hi), dim=-1).numpy().astype(np.float64)

    def raw(self, hi) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model.fine(hi).numpy().astype(np.float64)


def whitened(x: np.ndarray, wt) -> np.ndarray:
    y = x @ wt.weight.T.astype(np.float64) + wt.bias.astype(np.float64)
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def evaluate(q, g, b, q_ids, g_ids, truth, photo) -> dict:
    """The simulated search's metrics, rates and threshold grid."""
    q, g, b = (np.ascontiguousarray(v, dtype=np.float32) for v in (q, g, b))
    level = background_level(q, b, K)
    s = q @ g.T - BETA * level[:, None]
    top = np.argsort(-s, axis=1)[:, :TOPK]
    sc = np.take_along_axis(s, top, axis=1)
    qid = [q_ids[i] for i in range(len(q_ids)) for _ in range(TOPK)]
    m, curve = evaluate_results(qid, [r + 1 for _ in q_ids for r in range(TOPK)], [g_ids[j] for j in top.ravel()],
                                sc.ravel().tolist(), truth, (1,), (0.5,), (0.9,))
    tail = calibrate.fit(calibrate.null_scores(q, b, K, BETA), len(g_ids), len(q_ids), len(b))
    neg = np.array([not truth.matches.get(x) for x in q_ids])
    neg_pairs = np.sort(s[neg].ravel().astype(np.float64))
    best = s.max(axis=1)
    rates = []
    for t in TARGETS:
        thr = tail.threshold(t)
        seen = len(neg_pairs) - int(np.searchsorted(neg_pairs, thr, side="left"))
        rates.append({"target": t, "threshold": thr, "est": float(tail.fmr(thr)), "obs": seen / len(neg_pairs),
                      "seen": seen, "neg_flagged": int(np.sum(best[neg] >= thr)), "neg": int(neg.sum())})
    p90 = m["recall_at_precision"]["0.9"]["recall"]
    ops = []
    for t in GRID:
        thr = tail.threshold(t)
        n = int(np.sum(curve["threshold"] >= thr))
        ops.append({"target": t, "threshold": thr, "n": n,
                    "precision": float(curve["precision"][n - 1]) if n else None,
                    "recall": float(curve["recall"][n - 1]) if n else 0.0})
    ok = [o for o in ops if o["precision"] is not None and o["precision"] >= 0.85 and o["recall"] >= 0.8 * p90]
    pick = max(ok, key=lambda o: (o["recall"], -o["target"]))["target"] if ok else None
    return {"micro_ap": m["micro_ap"], "recall@1": m["recall@1"], "p90": p90, "rates": rates, "grid": ops,
            "pick": pick, "anchor_rate": tail.anchor[1]}


def show(label: str, r: dict, default_t: float | None) -> None:
    rates = "  ".join(f"T{x['target']:g}: est/obs {x['est']:.2e}/{x['obs']:.2e}"
                      f" ({(x['est'] / x['obs']) if x['obs'] else float('inf'):.2f}x) neg {x['neg_flagged']}/{x['neg']}"
                      for x in r["rates"])
    grid = " ".join(f"{o['target']:g}:{'-' if o['precision'] is None else format(o['precision'], '.3f')}/"
                    f"{o['recall'] / r['p90'] if r['p90'] else 0:.2f}" for o in r["grid"])
    mark = ""
    if default_t is not None:
        o = next(o for o in r["grid"] if o["target"] == default_t)
        mark = (f"  @T={default_t:g}: precision {o['precision'] if o['precision'] is None else round(o['precision'], 3)}"
                f" recall {o['recall']:.3f} = {o['recall'] / r['p90'] if r['p90'] else 0:.2f} x P90")
    print(f"{label:<34} uAP {r['micro_ap']:.4f} r@1 {r['recall@1']:.4f} P90 {r['p90']:.3f} pick {r['pick']}{mark}\n"
          f"    {rates}\n    grid (T:precision/recall-vs-P90) {grid}", flush=True)


SHARES = {"gallery": 0.0, "bg25": 0.25, "bg40": 0.4, "bg50": 0.5, "concat": None}


def variants(which: str) -> list[tuple[str, str, object, float]]:
    out = [("raw", "none", None, 0.0)]
    for fitset in SHARES:
        for shrink in (0.2, None):
            for power in (0.25, 0.35, 0.5):
                out.append((f"{fitset} s{shrink} p{power}", fitset, shrink, power))
    return out if which == "all" else [v for v in out if v[0] in which.split(",") or v[1] in which.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", default="/tmp/tune_fit_cal")
    ap.add_argument("--split", default="tune", choices=("tune", "test"))
    ap.add_argument("--variants", default="all")
    ap.add_argument("--background", default="data", help="data (the set's background photos), shipped, or both")
    ap.add_argument("--default-target", type=float, default=None, help="show this T's precision/recall")
    args = ap.parse_args()
    from retrieval.fit.whiten import fit_whitening, group_weights

    os.makedirs(args.work, exist_ok=True)
    split = os.path.join(args.data, args.split)
    truth = read_truth(bq.pipeline_truth(split, args.work))
    g_ids, g_hi = pooled(f"{args.split}-gallery", os.path.join(split, "gallery"), args.work)
    q_ids, q_hi = pooled(f"{args.split}-queries", os.path.join(split, "queries"), args.work)
    model = Model()
    g_pre, q_pre = model.pre(g_hi), model.pre(q_hi)
    out = {}
    for bg_name in (("data", "shipped") if args.background == "both" else (args.background,)):
        bg_dir = os.path.join(args.data, "background") if bg_name == "data" else SHIPPED
        _, b_hi = pooled(f"background-{bg_name}", bg_dir, args.work)
        b_pre = model.pre(b_hi)
        print(f"\n## split {args.split}: gallery {len(g_ids)}, queries {len(q_ids)}, background {bg_name} "
              f"{len(b_pre)}", flush=True)
        for label, fitset, shrink, power in variants(args.variants):
            if fitset == "none":
                q, g, b = model.raw(q_hi), model.raw(g_hi), model.raw(b_hi)
            else:
                share = SHARES[fitset]
                x = np.concatenate([g_pre, b_pre]) if share != 0.0 else g_pre
                w = None if share in (None, 0.0) else group_weights([len(g_pre), len(b_pre)], [1 - share, share])
                wt = fit_whitening(x, shrink, power, weights=w)
                q, g, b = whitened(q_pre, wt), whitened(g_pre, wt), whitened(b_pre, wt)
            r = evaluate(q, g, b, q_ids, g_ids, truth, None)
            show(label, r, args.default_target)
            out[f"{bg_name}/{label}"] = r
    with open(os.path.join(args.work, f"result-{args.split}.json"), "w") as fh:
        json.dump(out, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
