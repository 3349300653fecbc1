"""Are the estimated false-match rates right, and is the default threshold usable? (issue 22, item 3)

    .venv/bin/python tests/bench/bench_calibration.py --data /work/quality_data [--work /tmp/bench_calibration]
        [--configs default] [--fit [gallery|gallery+bg]] [--background data|shipped] [--targets 0.1,0.01,0.001]

On the quality benchmark's copy set (tests/bench/quality_data.py; docs/quality.md), per split
(``tune``, then ``test``) and model, through the ``retrieval`` CLI (``--engine local``): extract the
split's gallery -> index -> search the query images with ``search.normalize.background`` = the
set's background photos (extracted once per model), so every row carries ``fmr`` / ``fmr_query``
and the manifest the estimate (``calibration``). ``--fit`` runs ``retrieval fit`` on the split's
gallery first (with ``fit.background`` = the background images, as ``retrieval run --background``
does; ``--fit gallery``: the gallery alone) and uses the fitted model throughout. ``--background
shipped``: the images ``retrieval run`` ships instead of the set's background photos (with ``--fit
gallery``: the default path of ``retrieval run`` without ``--background``).

Printed:

1. **Rates**, per target false-match rate per query T (``--targets``): the threshold the report
   would use (``report.target_fmr = T``), and what happens there on the split's labels:
   - observed per query: the share of the NON-MATCHING queries whose best result scores >= it (a
     false match in the gallery; what T promises), with a 95% binomial interval;
   - per comparison, exact (512-d, normalised as the search does): the share of the (non-matching
     query, gallery image) pairs scoring >= it, against the estimate ``fmr`` at the threshold; and
     the same over all unrelated pairs (every query against every gallery image that is not its
     source: copies against the other crops of their source photo too, which share content).
2. **Default threshold**: for a grid of T, precision and recall of the rows flagged at ``norm_score
   >= threshold(T)`` against the best threshold at 90% precision (``retrieval evaluate``'s
   recall_at_precision 0.9); on ``tune`` the default T is chosen (the highest recall with precision
   >= 0.85 and >= 80% of the P90 recall; ties: the smaller T), on ``test`` its figures are reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_quality as bq  # noqa: E402  (puts the repository on sys.path)

from retrieval.evaluate import evaluate_results  # noqa: E402
from retrieval.metrics import read_truth  # noqa: E402

GRID = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 3e-4, 1e-4)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a binomial share ``k / n``."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def run_split(name: str, sets: list[str], data: str, split: str, work: str, fit: str | None, bg_url: str,
              bg_images: str) -> dict:
    """The pipeline on one split; returns what the measurements need. ``fit``: None (no fit),
    ``gallery`` (whitening on the gallery alone) or ``gallery+bg`` (with ``fit.background`` = the
    background images, as ``retrieval run`` fits)."""
    split_dir = os.path.join(data, split)
    d = os.path.join(work, name, split)
    os.makedirs(d, exist_ok=True)
    log = os.path.join(work, "commands.log")
    if fit:
        fitted = os.path.join(d, "fitted.pt")
        if not os.path.exists(fitted):
            extra = [f"fit.background={bg_images}"] if fit == "gallery+bg" else []
            bq.run("fit", "--input", os.path.join(split_dir, "gallery"), "--output", fitted, sets=sets + extra,
                   engine="local", log=log)
        sets = sets + [f"model.checkpoint={fitted}"]
        bg_url = os.path.join(d, "background")            # the background with the fitted model
    if not os.path.exists(os.path.join(bg_url, "_manifest.json")):
        bq.run("extract", "--input", bg_images, "--output", bg_url, "--role", "gallery",
               sets=sets, engine="local", log=log)
    for stage, args in (("extract", ["--input", os.path.join(split_dir, "gallery"), "--output", f"{d}/gallery",
                                     "--role", "gallery"]),
                        ("index", ["--features", f"{d}/gallery", "--output", f"{d}/index"])):
        if not os.path.exists(os.path.join(args[3], "_manifest.json")):
            bq.run(stage, *args, sets=sets, engine="local", log=log)
    out = f"{d}/search"
    if not os.path.exists(f"{out}/_manifest.json"):      # (a rerun in the same --work reuses every stage)
        bq.run("search", "--queries", os.path.join(split_dir, "queries"), "--index", f"{d}/index", "--output",
               out, sets=sets + [f"search.normalize.background={bg_url}"], engine="local", log=log)
    return {"dir": d, "results": out, "truth": read_truth(bq.pipeline_truth(split_dir, d)), "bg": bg_url,
            "data": data}


def exact_pairs(run: dict, manifest: dict) -> tuple[np.ndarray, list[str], list[str]]:
    """Every (query, gallery image) pair's normalised score, exactly (queries x gallery), with the ids."""
    from retrieval.extract.job import read_features
    from retrieval.schema import fine_matrix
    from retrieval.search.normalize import background_level

    def load(url):
        t = read_features(url)
        x = fine_matrix(t)
        return t.column("image_id").to_pylist(), x / np.linalg.norm(x, axis=1, keepdims=True)

    qids, q = load(manifest["query_features"])
    gids, g = load(f"{run['dir']}/gallery")
    _, b = load(run["bg"])
    nz = manifest["params"]["normalize"]
    level = background_level(q.astype(np.float32), b.astype(np.float32), int(nz["k"]))
    return (q @ g.T) - float(nz["beta"]) * level[:, None], qids, gids


def measure(run: dict, targets: list[float]) -> dict:
    from retrieval.search import read_results
    from retrieval.search.calibrate import NullTail

    manifest = json.load(open(f"{run['results']}/_manifest.json"))
    tail = NullTail.from_manifest(manifest["calibration"])
    truth = run["truth"]
    rows = read_results(run["results"]).to_pydict()
    best: dict[str, float] = {}
    for qid, s in zip(rows["query_id"], rows["norm_score"]):
        best[qid] = max(best.get(qid, -np.inf), s)
    negatives = [qid for qid, g in truth.matches.items() if not g]
    scores, qids, gids = exact_pairs(run, manifest)
    related = np.array([[g in truth.matches.get(qid, ()) for g in gids] for qid in qids])
    unrelated = np.sort(scores[~related].astype(np.float64))
    is_neg = np.array([not truth.matches.get(qid) for qid in qids])
    neg_pairs = np.sort(scores[is_neg].astype(np.float64).ravel())     # non-matching queries x gallery
    rates = []
    for t_rate in targets:
        thr = tail.threshold(t_rate)
        k = sum(1 for qid in negatives if best.get(qid, -np.inf) >= np.float32(thr))
        seen = len(unrelated) - int(np.searchsorted(unrelated, thr, side="left"))
        seen_neg = len(neg_pairs) - int(np.searchsorted(neg_pairs, thr, side="left"))
        rates.append({"target": t_rate, "threshold": thr, "neg_queries": len(negatives), "neg_flagged": k,
                      "observed": k / len(negatives), "interval": wilson(k, len(negatives)),
                      "fmr_at_threshold": float(tail.fmr(thr)), "pairs": len(unrelated), "pairs_seen": seen,
                      "observed_pair_rate": seen / len(unrelated), "neg_pairs": len(neg_pairs),
                      "neg_pairs_seen": seen_neg, "observed_neg_pair_rate": seen_neg / len(neg_pairs)})
    m, curve = evaluate_results(rows["query_id"], rows["rank"], rows["gallery_id"], rows["norm_score"], truth,
                                (1,), (0.5,), (0.9,))
    p90 = m["recall_at_precision"]["0.9"]
    photo = photo_of(run["data"])
    pairs: dict[tuple[str, str], float] = {}           # (query, gallery image) -> best score, as evaluate counts
    for qid, g, sc in zip(rows["query_id"], rows["gallery_id"], rows["norm_score"]):
        pairs[(qid, g)] = max(pairs.get((qid, g), -np.inf), sc)
    ops = []
    for t_rate in GRID:
        thr = tail.threshold(t_rate)
        n = int(np.sum(curve["threshold"] >= thr))          # the cut keeping every pair scoring >= thr
        wrong = [(qid, g) for (qid, g), sc in pairs.items() if sc >= thr and g not in truth.matches[qid]]
        # a copy flagged against another crop of its source photo: shared content, labelled distinct
        sibling = sum(1 for qid, g in wrong if truth.matches[qid]
                      and photo.get(g) == photo.get(next(iter(truth.matches[qid]))))
        ops.append({"target": t_rate, "threshold": thr, "flagged_pairs": n,
                    "precision": float(curve["precision"][n - 1]) if n else None,
                    "recall": float(curve["recall"][n - 1]) if n else 0.0, "wrong": len(wrong),
                    "wrong_sibling_crops": sibling,
                    "wrong_nonmatching_queries": sum(1 for qid, _ in wrong if not truth.matches[qid]),
                    "precision_without_sibling_crops": (n - len(wrong)) / (n - sibling) if n > sibling else None})
    return {"calibration": {k: manifest["calibration"][k] for k in ("pairs", "null_queries", "background",
                                                                   "gallery", "anchor_rate", "anchor_score",
                                                                   "sigma", "resolution")},
            "rates": rates, "p90": {"recall": p90["recall"], "threshold": p90["threshold"]}, "grid": ops,
            "quality": {"micro_ap": m["micro_ap"], "recall@1": m["recall@1"]},
            "counts": {"queries": len(truth.matches), "negatives": len(negatives), "pairs": truth.n_pairs}}


def photo_of(data: str) -> dict[str, int]:
    """Image file name -> the source photo it was cut from (the set's sources.json)."""
    with open(os.path.join(data, "sources.json")) as fh:
        sources = json.load(fh)["sources"]
    return {os.path.basename(im): i for i, s in enumerate(sources) for im in s["images"]}


def choose(grid: list[dict], p90_recall: float) -> dict | None:
    ok = [o for o in grid if o["precision"] is not None and o["precision"] >= 0.85
          and o["recall"] >= 0.8 * p90_recall]
    return max(ok, key=lambda o: (o["recall"], -o["target"])) if ok else None


def report(label: str, split: str, r: dict, chosen: float | None) -> None:
    c = r["calibration"]
    print(f"\n### {label}, split {split}: {r['counts']['queries']} queries ({r['counts']['negatives']} non-matching), "
          f"gallery {c['gallery']}, null {c['null_queries']} queries x {c['background']} background = {c['pairs']:,} "
          f"pairs (empirical down to {c['anchor_rate']:.1e} per comparison, exponential tail beyond, "
          f"sigma {c['sigma']:.4f})\n")
    print("| target per query | threshold (norm_score) | non-matching queries flagged | observed per query (95% CI) "
          "| est. fmr per comparison | observed per comparison: non-matching queries x gallery "
          "| all unrelated pairs (incl. copies vs other crops of their photo) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for x in r["rates"]:
        lo, hi = x["interval"]
        print(f"| {x['target']:g} | {x['threshold']:.4f} | {x['neg_flagged']} / {x['neg_queries']} | "
              f"{x['observed']:.4f} ({lo:.4f}-{hi:.4f}) | {x['fmr_at_threshold']:.2e} | "
              f"{x['observed_neg_pair_rate']:.2e} ({x['neg_pairs_seen']} / {x['neg_pairs']:,}) | "
              f"{x['observed_pair_rate']:.2e} ({x['pairs_seen']} / {x['pairs']:,}) |")
    print(f"\nbest threshold at 90% precision: norm_score {r['p90']['threshold']}, recall {r['p90']['recall']:.3f} "
          f"(two-stage search: µAP {r['quality']['micro_ap']:.4f}, recall@1 {r['quality']['recall@1']:.4f})\n")
    print("| target per query | threshold | flagged pairs | precision | recall | recall / recall@P90 "
          "| wrong pairs: non-matching queries / copy vs another crop of its photo / other "
          "| precision, other crops of the photo not counted |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for o in r["grid"]:
        mark = " **(default)**" if chosen is not None and o["target"] == chosen else ""
        prec = "-" if o["precision"] is None else f"{o['precision']:.3f}"
        rel = o["recall"] / r["p90"]["recall"] if r["p90"]["recall"] else float("nan")
        other = o["wrong"] - o["wrong_sibling_crops"] - o["wrong_nonmatching_queries"]
        ps = "-" if o["precision_without_sibling_crops"] is None else f"{o['precision_without_sibling_crops']:.3f}"
        print(f"| {o['target']:g}{mark} | {o['threshold']:.4f} | {o['flagged_pairs']} | {prec} | {o['recall']:.3f} "
              f"| {rel:.2f} | {o['wrong_nonmatching_queries']} / {o['wrong_sibling_crops']} / {other} | {ps} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", default="/tmp/bench_calibration")
    ap.add_argument("--configs", default="default", help="default, sscd, or name=checkpoint (as bench_quality)")
    ap.add_argument("--fit", nargs="?", const="gallery+bg", default=None, choices=("gallery", "gallery+bg"),
                    help="retrieval fit on each split's gallery first: with the background images in the "
                         "whitening (gallery+bg, the default: as retrieval run --background fits) or on the "
                         "gallery alone")
    ap.add_argument("--background", default="data", choices=("data", "shipped"),
                    help="the set's background photos, or the images retrieval run ships")
    ap.add_argument("--targets", default="0.1,0.01,0.001")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    args = ap.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    os.makedirs(args.work, exist_ok=True)
    out: dict = {}
    for name in args.configs.split(","):
        if name == "default":
            sets = []
        elif name == "sscd":
            sets = ["model.backbone=onnx", f"model.backbone_weights={bq.sscd_path()}", "model.checkpoint=null"]
        else:
            name, url = name.split("=", 1)
            sets = [f"model.checkpoint={url}"]
        sets += args.sets
        label = name + (f" + fit ({args.fit})" if args.fit else "") + f" + norm ({args.background} background)"
        tag = name + (f"-fit-{args.fit}" if args.fit else "") + ("-shipped" if args.background == "shipped" else "")
        bg = os.path.join(args.work, tag, "background")
        bg_images = os.path.join(args.data, "background") if args.background == "data" else os.path.join(
            bq.ROOT, "retrieval", "assets", "background")
        chosen = None
        for split in ("tune", "test"):
            t0 = time.monotonic()
            run = run_split(tag, sets, args.data, split, args.work, args.fit, bg, bg_images)
            r = measure(run, targets)
            if split == "tune":
                pick = choose(r["grid"], r["p90"]["recall"])
                chosen = pick["target"] if pick else None
            report(label, split, r, chosen)
            print(f"({split}: {time.monotonic() - t0:.0f}s)", flush=True)
            out[f"{label}/{split}"] = {**r, "chosen_target": chosen}
        print(f"\ndefault target chosen on tune: {chosen}")
    with open(os.path.join(args.work, "calibration.json"), "w") as fh:
        json.dump(out, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
