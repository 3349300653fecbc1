"""PDQ hashes vs the learned descriptor on the copy set, and the PDQ index's cost (issue 24 item 3).

    SPARK_LOCAL_IP=127.0.0.1 .venv/bin/python tests/bench/bench_pdq.py --data /work/quality_data \
        [--work /tmp/bench_pdq] [--engine local|spark] [--cost-n 1000000] [--skip-quality] [--skip-cost]

Quality (per split: ``tune`` chooses the descriptor's flag threshold, ``test`` reports): the real
pipeline through the CLI - extract the gallery with ``--set extract.pdq=true``, index it (the PDQ
index is built beside the shards), search the query images (the descriptor), ``pdq export`` the
queries' hashes and ``pdq match`` them against the index (distance <= 31, with and without the
dihedral variants). Per edit kind, recall@1 of each signal *as a flag*: a copy counts when the
signal flags it and its best match is the true source; PDQ flags a query when any gallery hash lies
within 31 bits, the descriptor when its best score reaches the threshold of 90% precision on the
tune split. Precision: correct flagged queries / all flagged queries (non-matching queries
included). Union: flagged by either signal, PDQ's best match first.

Cost: ``--cost-n`` random 256-bit hashes in the multi-hash index (build, bytes, range search per
query at radius 31) against a brute-force scan (``IndexBinaryFlat``), and the recall against it.
Random hashes are the hard case for the buckets' balance only in the other direction: real PDQ
hashes are correlated, so buckets are fuller and queries slower than on random bits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "bench"))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from bench_quality import pipeline_truth, read_edits, run  # noqa: E402

from retrieval.metrics import read_truth  # noqa: E402


def best_by_query(table, column: str, higher: bool) -> dict[str, tuple[str, float]]:
    """query -> (rank-1 gallery id, its value)."""
    out: dict[str, tuple[str, float]] = {}
    d = table.select(["query_id", "rank", "gallery_id", column]).to_pydict()
    for q, r, g, v in zip(d["query_id"], d["rank"], d["gallery_id"], d[column]):
        if r == 1:
            out[q] = (g, v)
    return out


def p90_threshold(best: dict[str, tuple[str, float]], truth) -> float:
    """The lowest score whose flags (best score >= it) are >= 90% correct."""
    items = sorted(((v, g in (truth.matches.get(q) or ())) for q, (g, v) in best.items()), reverse=True)
    correct, thr = 0, float("inf")
    for n, (v, ok) in enumerate(items, 1):
        correct += ok
        if correct / n >= 0.9:
            thr = v
    return thr


def split_signals(data: str, split: str, work: str, engine: str) -> dict:
    from retrieval.search.results import read_results

    sd, w = os.path.join(data, split), os.path.join(work, split)
    os.makedirs(w, exist_ok=True)
    log = os.path.join(w, "commands.log")
    sets = ["extract.pdq=true"]
    t = {}
    for pdq in ("false", "true"):   # extraction cost with and without the hashes, side by side
        r = run("extract", "--input", f"{sd}/gallery", "--output", f"{w}/gallery_pdq{pdq}", "--role", "gallery",
                sets=[f"extract.pdq={pdq}"], engine=engine, log=log)
        t[f"extract gallery pdq={pdq} s"] = round(r["_seconds"], 1)
    run("index", "--features", f"{w}/gallery_pdqtrue", "--output", f"{w}/index", sets=sets, engine=engine, log=log)
    if not os.path.exists(f"{w}/search/_manifest.json"):        # a rerun of the bench keeps the search
        run("search", "--queries", f"{sd}/queries", "--index", f"{w}/index", "--output", f"{w}/search", sets=sets,
            engine=engine, log=log)
    query_features = json.load(open(f"{w}/search/_manifest.json"))["query_features"]
    run("pdq", "export", "--features", query_features, "--output", f"{w}/queries.csv", "--overwrite", sets=sets,
        engine=engine, log=log)
    for dihedral, exact in (("false", "false"), ("true", "false"), ("false", "true")):
        tag = f"d{dihedral}" + ("_exact" if exact == "true" else "")
        r = run("pdq", "match", "--hash-list", f"{w}/queries.csv", "--index", f"{w}/index", "--output",
                f"{w}/pdq_{tag}", "--overwrite", sets=sets + [f"pdq.dihedral={dihedral}", f"pdq.exact={exact}"],
                engine=engine, log=log)
        t[f"pdq match dihedral={dihedral} exact={exact} s"] = round(r["_seconds"], 1)
    pairs = {tag: {(q, g) for q, g in zip(*read_results(f"{w}/pdq_{tag}").select(["query_id", "gallery_id"])
                                          .to_pydict().values())} for tag in ("dfalse", "dfalse_exact")}
    truth = read_truth(pipeline_truth(sd, w))
    return {"truth": truth, "edits": read_edits(sd), "timings": t,
            "descriptor": best_by_query(read_results(f"{w}/search"), "score", True),
            "pdq": best_by_query(read_results(f"{w}/pdq_dfalse"), "distance", False),
            "pdq8": best_by_query(read_results(f"{w}/pdq_dtrue"), "distance", False),
            "index": json.load(open(f"{w}/index/_manifest.json")).get("pdq"),
            "fast_vs_exact": {"pairs_exact": len(pairs["dfalse_exact"]), "pairs_fast": len(pairs["dfalse"]),
                              "recall": round(len(pairs["dfalse"] & pairs["dfalse_exact"]) /
                                              max(1, len(pairs["dfalse_exact"])), 4)}}


def flags(s: dict, thr: float) -> dict[str, dict[str, str]]:
    """signal -> query -> the gallery id it flags."""
    desc = {q: g for q, (g, v) in s["descriptor"].items() if v >= thr}
    pdq = {q: g for q, (g, _) in s["pdq"].items()}
    pdq8 = {q: g for q, (g, _) in s["pdq8"].items()}
    return {"descriptor": desc, "pdq": pdq, "pdq+dihedral": pdq8, "union": {**desc, **pdq},
            "union+dihedral": {**desc, **pdq8}}


def table(s: dict, thr: float) -> list[str]:
    truth, edits = s["truth"], s["edits"]
    f = flags(s, thr)
    copies = [q for q, g in truth.matches.items() if g]
    kinds = sorted({k for q in copies for k in edits.get(q, [])})
    names = list(f)
    lines = ["| edit kind | copies | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]

    def recall(qs, name):
        return np.mean([f[name].get(q) in truth.matches[q] for q in qs]) if qs else float("nan")
    for k in kinds:
        qs = [q for q in copies if k in edits.get(q, [])]
        lines.append(f"| {k} | {len(qs)} | " + " | ".join(f"{recall(qs, n):.3f}" for n in names) + " |")
    lines.append(f"| **all copies (recall@1)** | {len(copies)} | " + " | ".join(f"**{recall(copies, n):.3f}**"
                                                                             for n in names) + " |")
    prec = []
    for n in names:
        flagged = f[n]
        ok = sum(1 for q, g in flagged.items() if g in (truth.matches.get(q) or ()))
        prec.append(f"{ok / len(flagged):.3f} ({ok}/{len(flagged)})" if flagged else "-")
    lines.append("| **precision of the flags** | | " + " | ".join(prec) + " |")
    neg = [q for q, g in truth.matches.items() if not g]
    lines.append(f"| non-matching queries flagged | {len(neg)} | " + " | ".join(
        f"{sum(1 for q in neg if q in f[n])}" for n in names) + " |")
    return lines


def quality(args) -> None:
    tune = split_signals(args.data, "tune", args.work, args.engine)
    thr = p90_threshold(tune["descriptor"], tune["truth"])
    test = split_signals(args.data, "test", args.work, args.engine)
    print(f"\n### PDQ vs descriptor, test split (descriptor threshold {thr:.4f}: 90% precision on tune)\n")
    print("\n".join(table(test, thr)))
    print("\ntimings (test):", json.dumps(test["timings"]), "\nPDQ index (test):", json.dumps(test["index"]))
    print("pdq match pairs, fast (pdq.exact=false) vs exact, test:", json.dumps(test["fast_vs_exact"]),
          "tune:", json.dumps(tune["fast_vs_exact"]))


def cost(n: int, queries: int = 1000, seed: int = 0) -> None:
    import faiss

    from retrieval.index import pdq as pdq_index

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    t = time.monotonic()
    index = pdq_index.multihash(codes)
    build_s = time.monotonic() - t
    size = len(faiss.serialize_index_binary(index))
    faiss.omp_set_num_threads(1)            # per core, both searches
    print(f"\n### PDQ index cost, {n:,} random hashes (one thread)\n")
    print(f"- build (add to IndexBinaryMultiHash 16x16): {build_s:.1f} s; serialized {size / 1e6:.1f} MB "
          f"({size / n:.1f} B/hash; codes alone 32 B/hash)")
    for nflip in (0, "auto"):
        recall = pdq_index.measured_recall(index, codes, 31, seed=seed, n=queries, nflip=nflip)
        print(f"- range search <= 31 bits, nflip={nflip} (pdq.exact={nflip == 'auto'}): "
              f"{recall['index_ms_per_query']:.3f} ms/query vs brute force {recall['brute_force_ms_per_query']:.3f}"
              f" ms/query; recall vs brute force {recall['recall_vs_brute_force']} ({recall['pairs_brute_force']} "
              f"pairs, {recall['queries']} queries)")
        print(json.dumps({"n": n, "build_s": round(build_s, 2), "bytes": size, **recall}))


def hash_cost(data: str, n: int = 120, rounds: int = 3) -> None:
    """Per image: the model's decode + resize (draft) vs the PDQ hash's full decode + hash, alternated
    over the same files in one process (a shared machine: the ratio, not the absolute times)."""
    from retrieval.extract.preprocess import DecodePolicy, pdq_of, prepare

    files = sorted(os.listdir(os.path.join(data, "test", "gallery")))[:n]
    blobs = [open(os.path.join(data, "test", "gallery", f), "rb").read() for f in files]
    times = {"prepare": 0.0, "pdq": 0.0}
    for _ in range(rounds):
        for b in blobs:
            t = time.perf_counter()
            prepare(b, (224,), "squash", DecodePolicy())
            times["prepare"] += time.perf_counter() - t
            t = time.perf_counter()
            pdq_of(b)
            times["pdq"] += time.perf_counter() - t
    k = len(blobs) * rounds
    print(f"\n### Hash cost per image ({len(blobs)} test gallery JPEGs x {rounds}, alternated)\n")
    print(f"- model input (draft decode + resize to 224): {1000 * times['prepare'] / k:.2f} ms; PDQ (full decode + "
          f"hash + 7 dihedral): {1000 * times['pdq'] / k:.2f} ms ({times['pdq'] / times['prepare']:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/work/quality_data")
    ap.add_argument("--work", default="/tmp/bench_pdq")
    ap.add_argument("--engine", choices=("local", "spark"), default="local")
    ap.add_argument("--cost-n", type=int, default=1_000_000)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    args = ap.parse_args()
    if not args.skip_quality:
        quality(args)
    if not args.skip_cost:
        hash_cost(args.data)
        cost(args.cost_n)


if __name__ == "__main__":
    main()
