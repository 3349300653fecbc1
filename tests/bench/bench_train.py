"""Acceptance figures of the training issue, measured on held-out real photos and copies of them.

    SPARK_LOCAL_IP=127.0.0.1 .venv/bin/python tests/bench/bench_train.py [--asset retrieval/assets/default_model.npz]
        [--out /tmp/bench_train] [--skip-dist]

1. Trained (shipped default) heads vs seed-initialised heads, same ImageNet MobileNetV2 backbone, on
   (a) the sample of ``retrieval.sample.make_sample`` (gallery = holdout photos at R_hi via adapter 1 +
   fine head; queries = its generated copies + non-matching photos, via the query path) and
   (b) copies of the holdout photos made with the training augmentations at another seed:
   two-stage recall@1 and micro-AP; coarse recall@1 asymmetric (R_lo + adapter 2) vs symmetric
   (R_hi + adapter 1); stage-3 mean cosine adapter2(R_lo) vs adapter1(R_hi) of the same picture.
2. The query coarse encoding cost, asymmetric vs symmetric: wall-clock (best of interleaved repeats)
   and FLOPs.
3. The same short schedule single-process and through TorchDistributor(local_mode, 2 processes,
   gloo): both complete; their losses side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

METRICS = ("recall@1", "micro_ap", "coarse_recall@1_asym", "coarse_recall@1_sym", "shortlist_recall",
           "stage3_cos_clean", "stage3_cos_copies")


def _table(title: str, result: dict) -> str:
    models = result["models"]
    lines = [f"### {title}", f"{result['data']}", "", "| metric | " + " | ".join(models) + " |",
             "|---|" + "---|" * len(models)]
    for k in METRICS:
        lines.append(f"| {k} | " + " | ".join(f"{models[m][k]:.4f}" for m in models) + " |")
    return "\n".join(lines)


def sample_eval_set(gallery_url: str, queries_url: str, truth_csv: str, max_side: int = 1024):
    """An eval set from a gallery input, a query input and a truth CSV (``query_id,gallery_id``,
    empty gallery_id = no match), e.g. the output of :func:`retrieval.sample.make_sample`."""
    import numpy as np

    from retrieval.metrics import read_truth
    from retrieval.train.data import load_images
    from retrieval.train.validation import EvalSet

    g = load_images(gallery_url, max_side=max_side)
    q = load_images(queries_url, max_side=max_side)
    gidx = {gid: k for k, gid in enumerate(g.ids)}
    matches = read_truth(truth_csv).matches
    truth = []
    for qid in q.ids:
        if qid not in matches:
            raise ValueError(f"{truth_csv}: no row for query {qid!r}")
        if len(matches[qid]) > 1:
            raise ValueError(f"{truth_csv}: query {qid!r} has {len(matches[qid])} true matches; "
                             "this evaluation takes at most one per query")
        gid = next(iter(matches[qid]), "")
        if gid and gid not in gidx:
            raise ValueError(f"{truth_csv}: query {qid!r} -> {gid!r}, which is not in {gallery_url}")
        truth.append(gidx[gid] if gid else -1)
    return EvalSet(g.images, g.ids, q.images, q.ids, np.array(truth, np.int64),
                   f"{gallery_url} ({len(g)} images) vs {queries_url} ({len(q)} queries, "
                   f"{int((np.array(truth) >= 0).sum())} with a true match)")


def acceptance(asset: str, out: str, shortlist: int) -> dict:
    import torch

    from retrieval.model.delta import load_delta
    from retrieval.model.network import build_model
    from retrieval.recipes.default_model import write_manifest
    from retrieval.sample import make_sample, real_photos
    from retrieval.train.data import load_images
    from retrieval.train.validation import coarse_query_cost, copies_eval_set, evaluate_models

    models = {"trained (default)": load_delta(asset), "seed heads": build_model()}
    sample = make_sample(os.path.join(out, "sample"), seed=0)
    sets = {"sample (make_sample: holdout gallery, generated copies + non-matching)":
            sample_eval_set(sample["gallery"], sample["queries"], sample["truth"]),
            "holdout copies (training augmentations, unseen seed)":
            copies_eval_set(load_images(write_manifest(real_photos("holdout"),
                                                       os.path.join(out, "holdout.csv")), max_side=512),
                            copies=3, seed=2026, strength=0.6, distractor_fraction=0.25)}
    results = {name: evaluate_models(models, es, shortlist, timing=False) for name, es in sets.items()}
    # coarse query encoding cost: interleaved, best of repeats, at 2 threads and 1 thread
    queries = sets[next(iter(sets))].queries
    cost = {}
    for threads in (torch.get_num_threads(), 1):
        torch.set_num_threads(threads)
        cost[f"threads={threads}"] = coarse_query_cost(models["trained (default)"], queries, repeats=7, batch=16)
    return {"eval": results, "query_coarse_cost": cost, "shortlist": shortlist}


def dist_vs_single(out: str) -> dict:
    from retrieval.config import load
    from retrieval.recipes.default_model import write_manifest
    from retrieval.sample import real_photos
    from retrieval.engine.session import get_spark
    from retrieval.train.trainer import TrainJob, run_distributed, run_training

    photos = write_manifest(real_photos("train")[:16], os.path.join(out, "train16.csv"))
    sets = ["train.stages=[1,2,3]", "train.stage1.steps=4", "train.stage2.steps=30", "train.stage3.steps=30",
            "train.batch_size=8", "train.cache_views=3", "train.backbone_blocks=1", "train.checkpoint_every=10",
            "preprocess.size_hi=112", "preprocess.size_lo=80"]
    res = {}
    t0 = time.monotonic()
    res["single"] = run_training(TrainJob.from_config(photos, os.path.join(out, "single"), load(sets=sets)))
    res["single"]["wall_s"] = round(time.monotonic() - t0, 1)
    spark = get_spark("local[2]", "bench-train", {"spark.ui.enabled": "false"})
    try:
        t0 = time.monotonic()
        job = TrainJob.from_config(photos, os.path.join(out, "dist"), load(sets=[*sets, "train.processes=2"]))
        res["torchdistributor"] = run_distributed(spark, job, processes=2)
        res["torchdistributor"]["wall_s"] = round(time.monotonic() - t0, 1)
    finally:
        spark.stop()
    return {"schedule": sets, "runs": {k: {"processes": v["schedule"]["processes"], "wall_s": v["wall_s"],
                                           "model_version": v["model_version"],
                                           "final_loss": {s: st["final_loss"] for s, st in v["stages"].items()},
                                           "first_loss": {s: st["first_loss"] for s, st in v["stages"].items()}}
                                       for k, v in res.items()}}


def main() -> int:
    from retrieval.model.delta import DEFAULT_MODEL

    p = argparse.ArgumentParser()
    p.add_argument("--asset", default=DEFAULT_MODEL)
    p.add_argument("--out", default=None)
    p.add_argument("--shortlist", type=int, default=5)
    p.add_argument("--skip-dist", action="store_true")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench_train_")
    report = acceptance(args.asset, out, args.shortlist)
    lines = ["## Training acceptance (tests/bench/bench_train.py)", ""]
    for name, r in report["eval"].items():
        lines += [_table(name, r), ""]
    lines.append(f"two-stage search: coarse top-{args.shortlist} (asymmetric), then fine rerank")
    lines += ["", "### Query coarse encoding cost (asymmetric R_lo + adapter 2 vs symmetric R_hi + adapter 1)", "",
              "| threads | asym ms/img | sym ms/img | time ratio | asym GFLOPs | sym GFLOPs | FLOPs ratio |",
              "|---|---|---|---|---|---|---|"]
    for k, c in report["query_coarse_cost"].items():
        lines.append(f"| {c['threads']} | {c['asym_ms_per_image']:.1f} | {c['sym_ms_per_image']:.1f} | "
                     f"{c['time_ratio']:.3f} | {c['asym_gflops']:.3f} | {c['sym_gflops']:.3f} | {c['flops_ratio']:.3f} |")
    if not args.skip_dist:
        report["distributed"] = dist_vs_single(out)
        lines += ["", "### Same short schedule: single process vs TorchDistributor(local_mode, 2 processes, gloo)",
                  "", "| run | processes | wall s | stage 1 loss first -> final | stage 2 | stage 3 |",
                  "|---|---|---|---|---|---|"]
        for name, r in report["distributed"]["runs"].items():
            cells = [f"{r['first_loss'][s]:.4f} -> {r['final_loss'][s]:.4f}" for s in ("1", "2", "3")]
            lines.append(f"| {name} | {r['processes']} | {r['wall_s']} | " + " | ".join(cells) + " |")
    with open(os.path.join(out, "bench_train.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    print("\n".join(lines))
    print(f"\n(full JSON: {os.path.join(out, 'bench_train.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
