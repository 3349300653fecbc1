"""Query regions on the quality benchmark (issue 23 item 2): per edit kind, with and without regions.

    .venv/bin/python tests/bench/bench_regions.py --data /work/quality_data --split tune \
        [--work /tmp/bench_regions] [--all content,center70,grid2] [--sets "content;center70;content,center70"]
    .venv/bin/python tests/bench/bench_regions.py --data /work/quality_data --split test --search content,center70

Through the library (the code of ``retrieval extract`` / ``index`` / ``search``), shipped model,
no ``fit``: the split's gallery, the background photos and the queries are extracted once, the
queries with every region of ``--all`` (``extract.query_regions``). Each candidate set of ``--sets``
is then scored by exact 512-d search of the rows it keeps (the whole-image rows plus those regions),
merged per (query, gallery image) by :func:`retrieval.search.regions.merge` on the raw cosine
(``raw max``) and on the score normalised against the background (``norm``, search.normalize k 10,
beta 0.5: the search's defaults). ``--search SET``: also the two-stage search of the queries
extracted with no regions and with SET (each extraction timed: the encode cost), normalised, and
its search time and result rows. Figures: micro-AP, recall@1, recall@10, overall and per kind
(:func:`retrieval.metrics.kind_metrics`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from bench_quality import pipeline_truth, read_edits  # noqa: E402
from retrieval import config  # noqa: E402
from retrieval.evaluate import evaluate_results  # noqa: E402
from retrieval.metrics import read_truth  # noqa: E402

K = 10


def _extract(src: str, out: str, role: str, regions: list[str]) -> float:
    from retrieval.extract.job import extract

    if os.path.exists(os.path.join(out, "_manifest.json")):
        return json.load(open(os.path.join(out, "_manifest.json")))["timings"]["run_s"]
    cfg = config.load(sets=[f"extract.role={role}", "extract.num_shards=2",
                            f"extract.query_regions=[{','.join(regions)}]"])
    m = extract(src, out, cfg)
    return m["timings"]["run_s"]


def _metrics(qids, ranks, gids, scores, truth) -> dict:
    m, _ = evaluate_results(qids, ranks, gids, scores, truth, (1, 10), (0.5,), (0.9,))
    return {"micro_ap": m["micro_ap"], "recall@1": m["recall@1"], "recall@10": m["recall@10"],
            "per_kind": m.get("per_kind", {})}


def exact_table(q_url: str, g_url: str, bg_url: str, names: list[str], truth) -> dict[str, dict]:
    """Exact search of the rows of ``names`` (plus the whole images), merged: raw max and norm."""
    from retrieval.extract.features import read_features
    from retrieval.schema import fine_matrix
    from retrieval.search.normalize import background_level
    from retrieval.search.regions import merge, query_starts, take

    q = read_features(q_url, ["image_id", "fine", "fine_scale", "region"])
    keep = np.array([r is None or r.split(":")[0] in names for r in q.column("region").to_pylist()])
    q = q.filter(keep)
    g = read_features(g_url, ["image_id", "fine", "fine_scale"])
    bg = fine_matrix(read_features(bg_url, ["fine", "fine_scale"]))
    qf, gf = fine_matrix(q), fine_matrix(g)
    s = qf @ gf.T
    top = np.argsort(-s, axis=1)[:, :K]
    sc = np.take_along_axis(s, top, axis=1)
    norm = sc - 0.5 * background_level(qf, bg, 10)[:, None]
    starts = query_starts(q.column("region"))
    qid = np.array(q.column("image_id").to_pylist())[starts]
    gid = np.array(g.column("image_id").to_pylist())
    out = {}
    for label, key in (("raw max", sc), ("norm", norm)):
        ids, row, col = merge(starts, sc, top, key, K)
        val = take(key, row, col, np.nan)
        r, c = np.nonzero(ids >= 0)
        out[label] = _metrics(qid[r].tolist(), (c + 1).tolist(), gid[ids[r, c]].tolist(), val[r, c].tolist(), truth)
    out["rows_per_query"] = round(q.num_rows / len(starts), 3)
    return out


def search_row(q_url: str, idx: str, bg_url: str, out: str, truth) -> dict:
    from retrieval.search import read_results, search

    cfg = config.load(sets=[f"search.normalize.background={bg_url}"])
    m = search(q_url, idx, out, cfg, overwrite=True)
    d = read_results(out).to_pydict()
    row = _metrics(d["query_id"], d["rank"], d["gallery_id"], d["norm_score"], truth)
    row.update({"search_s": m["timings"]["search_s"], "rows": m["counts"]["rows"],
                "query_rows": m["counts"]["query_rows"], "queries": m["counts"]["queries"]})
    return row


def print_rows(rows: list[tuple[str, dict]]) -> None:
    kinds = sorted({k for _, m in rows for k in m["per_kind"]})
    print("| configuration | µAP | recall@1 | recall@10 |")
    print("|---|---:|---:|---:|")
    for label, m in rows:
        print(f"| {label} | {m['micro_ap']:.3f} | {m['recall@1']:.3f} | {m['recall@10']:.3f} |")
    for metric in ("recall@1", "recall@10", "micro_ap"):
        print(f"\n{metric} per kind:\n")
        print("| configuration | " + " | ".join(kinds) + " |")
        print("|---|" + "---:|" * len(kinds))
        for label, m in rows:
            print(f"| {label} | " + " | ".join(f"{m['per_kind'].get(k, {}).get(metric, float('nan')):.3f}"
                                                for k in kinds) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="tune", choices=("tune", "test"))
    ap.add_argument("--work", default="/tmp/bench_regions")
    ap.add_argument("--all", default="content,center70,grid2", help="regions extracted once")
    ap.add_argument("--sets", default="content;center70;content,center70;content,center70,grid2;grid2",
                    help="candidate sets (;-separated), scored by exact search")
    ap.add_argument("--search", default=None, metavar="SET", help="also the two-stage search with SET vs none")
    args = ap.parse_args()
    split = os.path.join(args.data, args.split)
    work = os.path.join(args.work, args.split)
    os.makedirs(work, exist_ok=True)
    truth = read_truth(pipeline_truth(split, work))
    edits = read_edits(split)
    truth.kinds = {q: set(k) for q, k in edits.items() if q in truth.matches}
    t = {"gallery_s": _extract(os.path.join(split, "gallery"), f"{work}/gallery", "gallery", []),
         "background_s": _extract(os.path.join(args.data, "background"), f"{args.work}/background", "gallery", [])}
    every = args.all.split(",")
    t["queries_all_s"] = _extract(os.path.join(split, "queries"), f"{work}/q_all", "query", every)
    rows = []
    for names in [[]] + [s.split(",") for s in args.sets.split(";") if s]:
        got = exact_table(f"{work}/q_all", f"{work}/gallery", f"{args.work}/background", names, truth)
        label = "whole image" if not names else "whole + " + " + ".join(names)
        for kind in ("raw max", "norm"):
            rows.append((f"{label} ({kind}, {got['rows_per_query']} rows/query)", got[kind]))
        print(f"  {label}: norm r@1 {got['norm']['recall@1']:.3f} uAP {got['norm']['micro_ap']:.3f}; "
              f"raw max r@1 {got['raw max']['recall@1']:.3f} uAP {got['raw max']['micro_ap']:.3f}", flush=True)
    print(f"\n### exact 512-d, split {args.split} ({json.dumps(t)})\n")
    print_rows(rows)
    if args.search:
        from retrieval.index.build import build_index

        names = args.search.split(",")
        idx = f"{work}/index"
        if not os.path.exists(os.path.join(idx, "_manifest.json")):
            build_index([f"{work}/gallery"], idx, config.load())
        t["queries_none_s"] = _extract(os.path.join(split, "queries"), f"{work}/q_none", "query", [])
        q_set = f"{work}/q_all" if names == every else f"{work}/q_{'_'.join(names)}"    # --all = SET: reused
        t["queries_set_s"] = _extract(os.path.join(split, "queries"), q_set, "query", names)
        srows = []
        for label, q in (("whole image", f"{work}/q_none"), ("whole + " + " + ".join(names), q_set)):
            r = search_row(q, idx, f"{args.work}/background", f"{work}/search_{os.path.basename(q)}", truth)
            srows.append((f"{label} (two-stage, norm; search {r['search_s']:.2f}s, {r['query_rows']} query rows, "
                          f"{r['rows']} result rows)", r))
        print(f"\n### two-stage search, split {args.split}; encode: {json.dumps(t)}\n")
        print_rows(srows)
        with open(os.path.join(work, "search_rows.json"), "w") as fh:
            json.dump({"timings": t, "rows": srows}, fh, indent=1)
    with open(os.path.join(work, "exact_rows.json"), "w") as fh:
        json.dump({"timings": t, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
