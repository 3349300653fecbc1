"""Geometric verification on the quality benchmark (issue 23 item 5): per edit kind, with and without.

    .venv/bin/python tests/bench/bench_verify.py --data /work/quality_data --split tune [--work /tmp/bench_verify]
    .venv/bin/python tests/bench/bench_verify.py --data /work/quality_data --split test \
        --set search.geometric.top=10 --set search.geometric.min_inliers=12 ...

Through the library (the code of ``retrieval extract`` / ``index`` / ``search``), shipped model and
defaults (query regions included), no ``fit``, scores normalised against the background photos
(``search.normalize``, the search's defaults otherwise): the split's gallery, the background and
the queries are extracted once and indexed, then searched without verification.

``--split tune``: the local-feature inlier counts of every result row (ranks 1-10; query and mirrored
query counted apart) are computed once per method (ORB, SIFT; each timed), then the combination
rule (:func:`retrieval.search.geometric.apply`, the search's own code) is scored for a grid of
``top`` x ``min_inliers`` x ``boost`` x ``cap`` x ``flip``; the best by µAP + recall@1 is printed
with the ``--set`` line to pass to the test run.

``--split test``: the search without verification and the search with ``search.geometric`` as set
(``--set``), both run here one after the other (the same process and machine), figures per kind
(micro-AP, recall@1, recall@10: :func:`retrieval.metrics.kind_metrics`) and the cost: the
verification's seconds per query and x the search time without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from bench_quality import pipeline_truth, read_edits  # noqa: E402
from bench_regions import print_rows  # noqa: E402
from retrieval import config  # noqa: E402
from retrieval.evaluate import evaluate_results  # noqa: E402
from retrieval.metrics import read_truth  # noqa: E402

TOP = 10


def _metrics(table, truth) -> dict:
    d = table.to_pydict()
    m, _ = evaluate_results(d["query_id"], d["rank"], d["gallery_id"], d["norm_score"], truth, (1, 10), (0.5,),
                            (0.9,))
    return {"micro_ap": m["micro_ap"], "recall@1": m["recall@1"], "recall@10": m["recall@10"],
            "per_kind": m.get("per_kind", {})}


def _extract(src: str, out: str, role: str) -> float:
    from retrieval.extract.job import extract

    if not os.path.exists(os.path.join(out, "_manifest.json")):
        extract(src, out, config.load(sets=[f"extract.role={role}", "extract.num_shards=2"]))
    return json.load(open(os.path.join(out, "_manifest.json")))["timings"]["run_s"]


def prepare(data: str, split: str, work: str) -> tuple[str, str, str]:
    """The split's gallery and queries extracted, the gallery indexed, the background extracted."""
    from retrieval.index.build import build_index

    sd = os.path.join(data, split)
    _extract(os.path.join(sd, "gallery"), f"{work}/gallery", "gallery")
    _extract(os.path.join(data, "background"), f"{os.path.dirname(work)}/background", "gallery")
    _extract(os.path.join(sd, "queries"), f"{work}/queries", "query")
    if not os.path.exists(f"{work}/index/_manifest.json"):
        build_index([f"{work}/gallery"], f"{work}/index", config.load())
    return f"{work}/queries", f"{work}/index", f"{os.path.dirname(work)}/background"


def run_search(q: str, idx: str, bg: str, out: str, sets: list[str]):
    from retrieval.search import read_results, search

    cfg = config.load(sets=[f"search.normalize.background={bg}", *sets])
    m = search(q, idx, out, cfg, overwrite=True)
    return read_results(out), m


def pair_counts(table, g, regions: bool) -> tuple[np.ndarray, ...]:
    """Per row (ranks <= TOP): inliers with the query, with the mirrored query and (``regions``) with
    the row's query region cropped and with its mirror (-1: the row has no region); the seconds."""
    from retrieval.search.geometric import Matcher, _box

    m = Matcher(dataclasses.replace(g, flip=True))
    qu, gu = table.column("query_uri").to_pylist(), table.column("gallery_uri").to_pylist()
    qr = table.column("query_region").to_pylist()
    ranks = table.column("rank").to_numpy()
    a = np.full(len(qu), -1, np.int64)
    b, c, d = a.copy(), a.copy(), a.copy()
    t = time.monotonic()
    for i in np.flatnonzero(ranks <= TOP):
        qf, gf = m.features(qu[i], True), m.features(gu[i])
        a[i], b[i] = m.count(qf[:2], gf), m.count(qf[2:], gf)
        if regions and _box(qr[i]):
            rf = m.features(qu[i], True, qr[i])
            c[i], d[i] = m.count(rf[:2], gf), m.count(rf[2:], gf)
    return a, b, c, d, time.monotonic() - t


def tune(table, truth, base_g, methods: list[str], regions: bool) -> list[tuple[float, dict, dict]]:
    from retrieval.search.geometric import apply

    out = []
    ranks = table.column("rank").to_numpy()
    tops = (5, 10) if regions else (1, 3, 5, 10)
    for method in methods:
        g0 = dataclasses.replace(base_g, method=method)
        a, b, c, d, secs = pair_counts(table, g0, regions)
        print(f"  {method}: {int((a >= 0).sum())} pairs counted in {secs:.1f}s "
              f"({1000 * secs / len(set(table.column('query_id').to_pylist())):.0f} ms/query, flip incl.)", flush=True)
        for top, mi, boost, cap, flip, reg in itertools.product(tops, (6, 10, 15, 25, 40), (0.05, 0.1, 0.2, 0.4, 0.8),
                                                                (25, 50, 100, 200), (False, True),
                                                                (False, True) if regions else (False,)):
            g = dataclasses.replace(g0, top=top, min_inliers=mi, boost=boost, cap=cap, flip=flip, regions=reg)
            n = np.maximum(a, b) if flip else a
            n = np.maximum(n, np.maximum(c, d) if flip else c) if reg else n
            n = np.where(ranks <= top, n, -1)
            m = _metrics(apply(table, n, [None] * len(n), g), truth)
            out.append((m["micro_ap"] + m["recall@1"], m, {"secs": secs, **dataclasses.asdict(g)}))
    return sorted(out, key=lambda r: -r[0])


def main() -> None:
    from retrieval.search.geometric import Geometric

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="tune", choices=("tune", "test"))
    ap.add_argument("--work", default="/tmp/bench_verify")
    ap.add_argument("--set", action="append", default=[], help="search.geometric.* settings for the test run")
    ap.add_argument("--methods", default="orb,sift", help="tune: the local features compared")
    ap.add_argument("--regions", action="store_true", help="tune: also the rule with search.geometric.regions")
    args = ap.parse_args()
    work = os.path.join(args.work, args.split)
    os.makedirs(work, exist_ok=True)
    sd = os.path.join(args.data, args.split)
    truth = read_truth(pipeline_truth(sd, work))
    truth.kinds = {q: set(k) for q, k in read_edits(sd).items() if q in truth.matches}
    q, idx, bg = prepare(args.data, args.split, work)
    base, m0 = run_search(q, idx, bg, f"{work}/search", [])
    n_q = m0["counts"]["queries"]
    rows = [(f"without verification (search {m0['timings']['search_s']:.2f}s)", _metrics(base, truth))]
    if args.split == "tune":
        got = tune(base, truth, Geometric(top=TOP), args.methods.split(","), args.regions)
        for score, m, g in got[:15]:
            print(f"  {score:.4f} uAP {m['micro_ap']:.3f} r@1 {m['recall@1']:.3f} r@10 {m['recall@10']:.3f} "
                  f"{ {k: g[k] for k in ('method', 'top', 'min_inliers', 'boost', 'cap', 'flip', 'regions')} }")
        for method in args.methods.split(","):
            best = next(r for r in got if r[2]["method"] == method)
            rows.append((f"best {method}: " + ", ".join(f"{k} {best[2][k]}" for k in
                                                        ("top", "min_inliers", "boost", "cap", "flip", "regions")), best[1]))
        best = got[0][2]
        print("\nchosen: " + " ".join(f"--set search.geometric.{k}={str(best[k]).lower()}" for k in
                                      ("method", "top", "min_inliers", "boost", "cap", "flip", "regions")))
    else:
        t = time.monotonic()
        ver, m1 = run_search(q, idx, bg, f"{work}/search_geometric", args.set)
        wall = time.monotonic() - t
        geo_s = m1["timings"]["geometric_s"]
        rows.append((f"with {m1['params']['geometric']} (search {m1['timings']['search_s']:.2f}s)",
                     _metrics(ver, truth)))
        print(f"\ncost: verification {geo_s:.2f}s = {1000 * geo_s / n_q:.1f} ms/query over {n_q} queries "
              f"({m1['counts']['geometric_rows']} rows verified, {m1['counts']['geometric_images']} images "
              f"described, {m1['counts']['geometric_errors']} errors); search without it "
              f"{m0['timings']['search_s']:.2f}s = {1000 * m0['timings']['search_s'] / n_q:.1f} ms/query, with it "
              f"{m1['timings']['search_s']:.2f}s (wall {wall:.1f}s): x{m1['timings']['search_s'] / m0['timings']['search_s']:.1f}")
    print(f"\n### bench_verify, split {args.split} ({n_q} queries)\n")
    print_rows(rows)


if __name__ == "__main__":
    main()
