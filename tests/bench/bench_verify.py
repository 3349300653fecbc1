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


PREVIOUS = [f"search.geometric.{k}={v}" for k, v in dict(
    top=10, method="orb", features=1000, iters=2000, gate=-1e9, early="false", min_inliers=10, boost=0.8, cap=100,
    flip="true", regions="true", max_side=512).items()]


def _flags(table, manifest: dict, truth) -> str:
    """What the report flags without truth (``report.threshold: auto``: the ``report.target_fmr``
    threshold of the search's null calibration, fitted before any boost): queries with no copy
    flagged (false alarms), copies flagged with their true match at rank 1, precision of the rows."""
    from retrieval.search.calibrate import NullTail

    target = float(config.load()["report.target_fmr"])
    t = NullTail.from_manifest(manifest["calibration"]).threshold(target)
    d = table.to_pydict()
    top = {q: (g, s) for q, r, g, s in zip(d["query_id"], d["rank"], d["gallery_id"], d["norm_score"]) if r == 1}
    no_copy = [q for q in top if not truth.matches.get(q)]
    false_q = sum(top[q][1] >= t for q in no_copy)
    flagged = [(q, g) for q, g, s in zip(d["query_id"], d["gallery_id"], d["norm_score"]) if s >= t]
    true = sum(g in (truth.matches.get(q) or ()) for q, g in flagged)
    return (f"at norm_score >= {t:.4f} (target_fmr {target:g}): {false_q} of {len(no_copy)} queries with no copy "
            f"flagged (expected ~{target * len(no_copy):.1f}), {len(flagged)} rows flagged, precision "
            f"{true / max(len(flagged), 1):.3f}")


def _encode_s(src: str, out: str) -> float:
    """The seconds of ``extract --role query`` (default regions) on the split's queries, here, now."""
    from retrieval.extract.job import extract

    extract(src, out, config.load(sets=["extract.role=query", "extract.num_shards=2", "extract.mode=overwrite"]))
    return json.load(open(os.path.join(out, "_manifest.json")))["timings"]["run_s"]


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
    the row's query region cropped and with its mirror (-1: the row has no region); the seconds.
    Every match counted (no early exit), RANSAC skipped below the grid's smallest ``min_inliers``."""
    from retrieval.search.geometric import Matcher, _box

    m = Matcher(dataclasses.replace(g, flip=True, early=False, min_inliers=min(MIN_INLIERS)))
    qu, gu = table.column("query_uri").to_pylist(), table.column("gallery_uri").to_pylist()
    qr = table.column("query_region").to_pylist()
    ranks = table.column("rank").to_numpy()
    a = np.full(len(qu), -1, np.int64)
    b, c, d = a.copy(), a.copy(), a.copy()
    t = time.monotonic()
    for i in np.flatnonzero(ranks <= TOP):
        gf = m.features(gu[i])
        a[i], b[i] = m.count(m.features(qu[i]), gf), m.count(m.features(qu[i], True), gf)
        if regions and _box(qr[i]):
            c[i], d[i] = m.count(m.features(qu[i], False, qr[i]), gf), m.count(m.features(qu[i], True, qr[i]), gf)
    return a, b, c, d, time.monotonic() - t


MIN_INLIERS = (6, 10, 15, 25, 40)
GATES = (-1e9, 0.0, 0.05, 0.1, 0.15, 0.2)


def tune(table, truth, base_g, methods: list[str], regions: bool, features: list[int],
         iters: list[int]) -> list[tuple[float, dict, dict]]:
    """The grid (per method x features x RANSAC iterations: counted once, then every rule scored);
    each entry's ``rows``: rows verified per query (the cost's driver)."""
    from retrieval.search.geometric import apply, rows_to_check

    out = []
    n_q = len(set(table.column("query_id").to_pylist()))
    tops = (3, 5, 10) if regions else (1, 3, 5, 10)
    for method, nf, it in itertools.product(methods, features, iters):
        g0 = dataclasses.replace(base_g, method=method, features=nf, iters=it)
        a, b, c, d, secs = pair_counts(table, g0, regions)
        print(f"  {method} features {nf} iters {it}: {int((a >= 0).sum())} pairs counted in {secs:.1f}s "
              f"({1000 * secs / n_q:.0f} ms/query, flip and regions incl., no gate)", flush=True)
        for top, gate, mi, boost, cap, flip, reg in itertools.product(
                tops, GATES, MIN_INLIERS, (0.2, 0.4, 0.8), (50, 100), (False, True) if not regions else (True,),
                (True,) if regions else (False,)):
            g = dataclasses.replace(g0, top=top, gate=gate, min_inliers=mi, boost=boost, cap=cap, flip=flip, regions=reg)
            n = np.maximum(a, b) if flip else a
            n = np.maximum(n, np.maximum(c, d) if flip else c) if reg else n
            check = rows_to_check(table, g)
            n = np.where(check, n, -1)
            m = _metrics(apply(table, n, [None] * len(n), g), truth)
            out.append((m["micro_ap"] + m["recall@1"], m, {"secs": secs, "rows": check.sum() / n_q,
                                                           **dataclasses.asdict(g)}))
    return sorted(out, key=lambda r: -r[0])


KEYS = ("method", "features", "iters", "top", "gate", "min_inliers", "boost", "cap", "flip", "regions")


def _show(r) -> str:
    score, m, g = r
    return (f"{score:.4f} uAP {m['micro_ap']:.3f} r@1 {m['recall@1']:.3f} r@10 {m['recall@10']:.3f} "
            f"rows/query {g['rows']:.2f} { {k: g[k] for k in KEYS} }")


def main() -> None:
    from retrieval.search.geometric import Geometric

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="tune", choices=("tune", "test"))
    ap.add_argument("--work", default="/tmp/bench_verify")
    ap.add_argument("--set", action="append", default=[],
                    help="search.geometric.* settings to measure (the test run; on tune: measure them, no grid)")
    ap.add_argument("--methods", default="orb,sift", help="tune: the local features compared")
    ap.add_argument("--regions", action="store_true", help="tune: the rule with search.geometric.regions")
    ap.add_argument("--features", default="1000", help="tune: local features per image, comma-separated")
    ap.add_argument("--iters", default="2000", help="tune: RANSAC iterations, comma-separated")
    ap.add_argument("--also", action="append", default=[],
                    help="measure: also this variant of the --set rule (k=v,k=v of search.geometric)")
    ap.add_argument("--before", action="store_true", help="test: also the previous rule (no gate, no early exit)")
    ap.add_argument("--encode", action="store_true", help="test: also time extract --role query on the queries")
    ap.add_argument("--slack", type=float, default=0.01,
                    help="tune: the cheapest rule (fewest rows verified) within this of the best µAP + recall@1")
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
    print(f"report flags without truth, no verification: {_flags(base, m0, truth)}", flush=True)
    if args.split == "tune" and not args.set:
        got = tune(base, truth, Geometric(top=TOP), args.methods.split(","), args.regions,
                   [int(x) for x in args.features.split(",")], [int(x) for x in args.iters.split(",")])
        for r in got[:15]:
            print("  " + _show(r))
        print("\nthe best rule per features x iters x gate (the cost's drivers: features per image, rows per query):")
        seen = set()
        for r in got:
            key = (r[2]["features"], r[2]["iters"], r[2]["gate"])
            if key not in seen:
                seen.add(key)
                print("  " + _show(r))
        cheap = min((r for r in got if r[0] >= got[0][0] - args.slack), key=lambda r: (r[2]["rows"], r[2]["features"], -r[0]))
        print(f"\ncheapest within {args.slack} of the best:\n  " + _show(cheap))
        for name, r in (("best", got[0]), ("cheapest", cheap)):
            rows.append((f"{name}: " + ", ".join(f"{k} {r[2][k]}" for k in KEYS[:-2]) + f" ({r[2]['rows']:.2f} rows/query)",
                         r[1]))
        best = cheap[2]
        print("\nchosen: " + " ".join(f"--set search.geometric.{k}={str(best[k]).lower()}" for k in KEYS))
    else:
        enc = _encode_s(os.path.join(sd, "queries"), f"{work}/queries_timed") if args.encode else None
        runs = ([("the previous rule (no gate, no early exit)", PREVIOUS)] if args.before else []) + [
            ("this rule", args.set)] + [
            (f"this rule with {also}", args.set + [f"search.geometric.{kv}" for kv in also.split(",")])
            for also in args.also]
        for name, sets in runs:
            ver, m1 = run_search(q, idx, bg, f"{work}/search_geometric", sets)
            rows.append((f"{name}: {m1['params']['geometric']} (search {m1['timings']['search_s']:.2f}s)",
                         _metrics(ver, truth)))
            print(f"report flags without truth, {name}: {_flags(ver, m1, truth)}", flush=True)
            geo_s, s0 = m1["timings"]["geometric_s"], m0["timings"]["search_s"]
            print(f"\ncost, {name}: verification {geo_s:.2f}s = {1000 * geo_s / n_q:.1f} ms/query over {n_q} queries "
                  f"({m1['counts']['geometric_rows']} rows verified, {m1['counts']['geometric_images']} images "
                  f"read, {m1['counts']['geometric_errors']} errors) = x{geo_s / s0:.1f} the search without it "
                  f"({s0:.2f}s = {1000 * s0 / n_q:.1f} ms/query)"
                  + (f" = x{geo_s / enc:.2f} the query encode (extract --role query, default regions: {enc:.2f}s = "
                     f"{1000 * enc / n_q:.1f} ms/query)" if enc else ""), flush=True)
    print(f"\n### bench_verify, split {args.split} ({n_q} queries)\n")
    print_rows(rows)


if __name__ == "__main__":
    main()
