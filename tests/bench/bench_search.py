"""Benchmark of the two-stage search against exact 512-d brute force (docs/search.md "Benchmark").

    .venv/bin/python tests/bench/bench_search.py                 # 1M gallery, 10k + 10k queries
    .venv/bin/python tests/bench/bench_search.py --gallery 100000 --match 2000 --nomatch 2000 --no-spark-grid
    .venv/bin/python tests/bench/bench_search.py --shortlists 200 --nprobes 16 --normalize 1000,2000,10000

What it does, in one run (fixed seed; the data and index are cached in --workdir and reused when
the sizes match):
1. a synthetic gallery (``retrieval.synthetic``, default ``SyntheticSpec``) written as a real
   extraction output (int8 fine vectors, 8 files), and matching + non-matching queries written as a
   query feature output;
2. the index, built once with ``retrieval.index.build.build_index`` (its default parameters);
3. exact 512-d brute force: faiss ``IndexFlatIP`` over the stored (dequantised) gallery vectors,
   all queries, timed (search only: loading the vectors is not counted, which favours it);
4. the library path (``search(..., spark=None)``) at shortlist 100/500/1000 x two nprobe values, and
   the Spark job end to end (``retrieval search`` in a subprocess: JVM start, planning, writing and
   the manifest included) for the default setting (``--spark-grid``: for every setting);
5. per setting: queries/s, speed-up over brute force, rank-1 source rate on the matching queries
   (two-stage vs exact, and the share of exact's rank-1 hits that two-stage keeps), recall@10 of
   the two-stage top-10 against the exact top-10.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from retrieval import config, fsio, synthetic  # noqa: E402
from retrieval.features.extract import read_features  # noqa: E402
from retrieval.schema import fine_matrix  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(args) -> tuple[str, str, str, np.ndarray]:
    """Gallery features, query features, index (cached by size); returns urls and query sources."""
    from retrieval.index.params import choose_params
    from retrieval.schema import FEATURE_LAYOUT

    spec = synthetic.SyntheticSpec()
    # cached per size, seed and feature-file layout; the index per its (default) parameters
    tag = f"g{args.gallery}_m{args.match}_n{args.nomatch}_s{spec.seed}_l{FEATURE_LAYOUT}"
    work = os.path.join(args.workdir, tag)
    key = choose_params(args.gallery, synthetic.COARSE_DIM, config.load()).index_key
    gal, qf, idx = (os.path.join(work, n) for n in ("gallery", "queries", "index_" + key.replace(",", "_")))
    src_file = os.path.join(work, "sources.npy")
    if not fsio.exists(os.path.join(gal, "_manifest.json")):
        t = time.monotonic()
        coarse, fine = synthetic.gallery(args.gallery, spec)
        synthetic.write_feature_output(gal, coarse, fine, num_files=8, storage="int8")
        del coarse, fine
        log(f"gallery: {args.gallery} items written in {time.monotonic() - t:.0f}s")
    if not fsio.exists(os.path.join(qf, "_manifest.json")):
        t = time.monotonic()
        qc, qfine, source = synthetic.queries(args.gallery, args.match, args.nomatch, spec)
        synthetic.write_feature_output(qf, qc.astype(np.float32), qfine.astype(np.float32), num_files=2,
                                       storage="int8", role="query", id_prefix="q")
        np.save(src_file, source)
        log(f"queries: {len(source)} written in {time.monotonic() - t:.0f}s")
    if not fsio.exists(os.path.join(idx, "manifest.json")):   # retrieval.index.store.MANIFEST
        from retrieval.index.build import build_index

        t = time.monotonic()
        build_index([gal], idx, config.load(), spark=None)
        log(f"index built in {time.monotonic() - t:.0f}s")
    return gal, qf, idx, np.load(src_file)


def brute_force(gal: str, qf: str, k: int, cache_file: str, sample: int
                ) -> tuple[np.ndarray, float, np.ndarray]:
    """Exact top-k gallery rows (global row numbers) of every query, and the brute-force q/s
    measured NOW (all queries the first time; when the exact lists are already in ``cache_file``,
    only the speed is re-measured on ``sample`` queries, side by side with this run)."""
    import faiss

    xb = fine_matrix(read_features(gal, ["fine", "fine_scale"]))
    q = read_features(qf, ["image_id", "fine", "fine_scale"])
    xq = np.ascontiguousarray(fine_matrix(q))
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    del xb
    if os.path.exists(cache_file):
        d = np.load(cache_file)
        sel = xq[np.random.default_rng(0).choice(len(xq), min(sample, len(xq)), replace=False)]
        t = time.monotonic()
        index.search(sel, k)
        qps = len(sel) / (time.monotonic() - t)
        log(f"brute force: exact lists from {cache_file}; speed re-measured on {len(sel)} queries")
        return d["rows"], qps, d["qids"]
    t = time.monotonic()
    _, rows = index.search(xq, k)
    qps = len(xq) / (time.monotonic() - t)
    qids = np.array(q.column("image_id").to_pylist())
    np.savez(cache_file, rows=rows, qids=qids)
    return rows, qps, qids


def two_stage_rows(out: str) -> dict[str, list[str]]:
    from retrieval.search import read_results

    d = read_results(out).select(["query_id", "rank", "gallery_id"]).to_pydict()
    res: dict[str, list[tuple[int, str]]] = {}
    for q, r, g in zip(d["query_id"], d["rank"], d["gallery_id"]):
        res.setdefault(q, []).append((r, g))
    return {q: [g for _, g in sorted(v)] for q, v in res.items()}


def score(res: dict[str, list[str]], qids: np.ndarray, source: np.ndarray, exact_rows: np.ndarray) -> dict:
    match = source >= 0
    exact_ids = [[synthetic.image_id(int(r)) for r in row if r >= 0] for row in exact_rows]
    src_ids = [synthetic.image_id(int(s)) if s >= 0 else None for s in source]
    ts_hit = np.array([bool(res.get(q)) and res[q][0] == s for q, s in zip(qids, src_ids)])
    ex_hit = np.array([bool(e) and e[0] == s for e, s in zip(exact_ids, src_ids)])
    kept = [len(set(res.get(q, [])[:10]) & set(e[:10])) / max(len(e[:10]), 1) for q, e in zip(qids, exact_ids)]
    return {"rank1_two_stage": float(ts_hit[match].mean()), "rank1_exact": float(ex_hit[match].mean()),
            "rank1_retained": float((ts_hit & ex_hit)[match].sum() / max(ex_hit[match].sum(), 1)),
            "recall10_vs_exact": float(np.mean(kept))}


def run_library(qf: str, idx: str, out: str, sets: list[str]) -> float:
    """One library call; the per-run sha256 check of every index and gallery file is timed
    separately (``verify_s`` in main), so these seconds are the search itself."""
    from retrieval.search import search

    cfg = config.load(sets=[*sets, "search.verify=false"])
    t = time.monotonic()
    search(qf, idx, out, cfg, spark=None)
    return time.monotonic() - t


def run_spark(qf: str, idx: str, out: str, sets: list[str]) -> float:
    cmd = [sys.executable, "-m", "retrieval.cli", "search", "--queries", qf, "--index", idx, "--output", out,
           "--log-level", "WARNING"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYTHONPATH=ROOT)
    t = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t
    if proc.returncode != 0:
        raise RuntimeError(f"spark search failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--match", type=int, default=10_000)
    ap.add_argument("--nomatch", type=int, default=10_000)
    ap.add_argument("--shortlists", default="100,200,500,1000",
                    help="shortlist sizes (the default, search.shortlist 0 = by gallery size, is added)")
    ap.add_argument("--nprobes", default="", help="nprobe values (default: the index's tuned one and "
                                                   "search.nprobe, or 4x the tuned one when they agree)")
    ap.add_argument("--query-chunk", type=int, default=None, help="search.query_chunk (default: config)")
    ap.add_argument("--workdir", default="/tmp/bench_search")
    ap.add_argument("--spark-grid", action="store_true", help="run the Spark job at every setting")
    ap.add_argument("--no-spark", action="store_true")
    ap.add_argument("--brute-sample", type=int, default=2000,
                    help="queries to re-time brute force on when the exact lists are cached")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--normalize", default="", help="background sizes (e.g. 2000,10000): the cost of score "
                                                    "normalisation at the default setting, library and Spark job")
    ap.add_argument("--repeats", type=int, default=3, help="library runs per setting (median reported, with "
                                                            "min-max; --normalize: interleaved per variant)")
    args = ap.parse_args()

    import faiss

    log(f"threads: faiss {faiss.omp_get_max_threads()}, cpus {os.cpu_count()}")
    gal, qf, idx, source = prepare(args)
    from retrieval.index.store import read_index_manifest

    index_manifest = read_index_manifest(idx)
    base_nprobe = int(index_manifest.get("nprobe", 16))
    default_cfg = config.load()
    default_nprobe = default_cfg.search.nprobe or base_nprobe
    nprobes = [int(x) for x in args.nprobes.split(",")] if args.nprobes else \
        sorted({base_nprobe, default_nprobe} if base_nprobe != default_nprobe else {base_nprobe, 4 * base_nprobe})
    from retrieval.search.job import resolve_shortlist

    default_shortlist = resolve_shortlist(default_cfg.search.shortlist, index_manifest)
    shortlists = sorted({int(x) for x in args.shortlists.split(",")} | {default_shortlist})
    n_q = len(source)
    log(f"index: {len(index_manifest['shards'])} shards, default nprobe {base_nprobe}; "
        f"{index_manifest.get('index_type') or index_manifest.get('factory') or ''}")

    exact_rows, bf_qps, qids = brute_force(gal, qf, 10, os.path.join(os.path.dirname(gal), "exact_top10.npz"),
                                           args.brute_sample)
    bf_s = n_q / bf_qps           # brute-force seconds for all the queries at the measured speed
    log(f"brute force: {bf_qps:.1f} q/s = {bf_s:.0f}s for the {n_q} queries")

    from retrieval.search.job import verify_index_inputs

    t = time.monotonic()
    verify_index_inputs(idx, index_manifest)
    verify_s = time.monotonic() - t
    log(f"sha256 of every index and gallery file (done once per search run, before the search): {verify_s:.1f}s")
    # the first library call of a process loads the shards and decodes the gallery row groups it
    # needs into the per-process caches: timed separately, the grid below runs warm
    cold_sets = [f"search.query_chunk={args.query_chunk}"] if args.query_chunk else []
    cold_s = run_library(qf, idx, os.path.join(args.workdir, "out", "lib_cold"), cold_sets)
    log(f"library, first call in the process (cold caches), shortlist "
        f"{default_shortlist}, nprobe {default_nprobe}: {cold_s:.1f}s = {n_q / cold_s:.0f} q/s")
    rows = []
    for nprobe in nprobes:
        for S in shortlists:
            sets = [f"search.shortlist={S}", f"search.nprobe={nprobe}"]
            if args.query_chunk:
                sets.append(f"search.query_chunk={args.query_chunk}")
            out = os.path.join(args.workdir, "out", f"lib_s{S}_p{nprobe}")
            runs = [run_library(qf, idx, out, sets) for _ in range(max(1, args.repeats))]
            lib_s = float(np.median(runs))
            stages = json.loads(fsio.read_text(os.path.join(out, "_manifest.json")))["timings"]
            row = {"shortlist": S, "nprobe": nprobe, "library_s": round(lib_s, 2),
                   "library_s_min": round(min(runs), 2), "library_s_max": round(max(runs), 2),
                   "library_qps": round(n_q / lib_s, 1), "library_speedup": round(bf_s / lib_s, 1),
                   "stages_s": {k: stages.get(k) for k in ("coarse_s", "merge_s", "rerank_s", "write_s")},
                   **score(two_stage_rows(out), qids, source, exact_rows)}
            is_default = S == default_shortlist and nprobe == default_nprobe
            row["default"] = is_default
            if not args.no_spark and (args.spark_grid or is_default):
                sout = os.path.join(args.workdir, "out", f"spark_s{S}_p{nprobe}")
                spark_s = run_spark(qf, idx, sout, sets)
                sres = two_stage_rows(sout)
                row.update({"spark_s": round(spark_s, 2), "spark_qps": round(n_q / spark_s, 1),
                            "spark_speedup": round(bf_s / spark_s, 1),
                            "spark_equals_library": sres == two_stage_rows(out)})
            rows.append(row)
            log(json.dumps(row))

    print()
    for r in rows:
        st = r["stages_s"]
        print(f"warm stages, shortlist {r['shortlist']}, nprobe {r['nprobe']} (last run, s): " +
              ", ".join(f"{k[:-2]} {v}" for k, v in st.items()))
    norm_rows = normalisation_cost(args, qf, idx, default_shortlist, default_nprobe) if args.normalize else []

    print()
    print(f"gallery {args.gallery:,}, queries {n_q:,} ({args.match:,} matching), {os.cpu_count()} cores; "
          f"brute force (faiss IndexFlatIP, 512-d) {bf_qps:.1f} q/s ({bf_s:.0f}s for all); library first call "
          f"(cold caches) {n_q / cold_s:.0f} q/s ({bf_s / cold_s:.0f}x); library rows below: warm caches, "
          f"without the per-run sha256 check of the index and gallery files ({verify_s:.1f}s); "
          f"Spark rows: the whole job in a new process with defaults (JVM start and the check included)")
    print()
    print(f"library q/s: the median of {args.repeats} warm runs (q/s at the slowest - fastest run in brackets)")
    print()
    print("| shortlist | nprobe | library q/s | x brute | Spark job q/s | x brute | rank-1 two-stage | "
          "rank-1 exact | exact's rank-1 kept | recall@10 vs exact |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        sp = f"{r['spark_qps']:.0f} | {r['spark_speedup']:.1f}x" if "spark_qps" in r else "- | -"
        spread = f" ({n_q / r['library_s_max']:.0f}-{n_q / r['library_s_min']:.0f})"
        print(f"| {r['shortlist']}{' (default)' if r['default'] else ''} | {r['nprobe']} | {r['library_qps']:.0f}{spread} | {r['library_speedup']:.0f}x | {sp} | "
              f"{100 * r['rank1_two_stage']:.2f}% | {100 * r['rank1_exact']:.2f}% | "
              f"{100 * r['rank1_retained']:.2f}% | {100 * r['recall10_vs_exact']:.2f}% |")
    if norm_rows:
        print()
        print(f"score normalisation at the default setting (shortlist {default_shortlist}, nprobe {default_nprobe}); "
              f"library: median of {args.repeats} interleaved warm runs (min-max); Spark job: one run each")
        print()
        print("| background | library s, off | library s, on | cost | normalize_s (manifest) | Spark job s, off | "
              "Spark job s, on | cost |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in norm_rows:
            print(f"| {r['background']:,} | {r['lib_off']:.2f} ({r['lib_off_min']:.2f}-{r['lib_off_max']:.2f}) | "
                  f"{r['lib_on']:.2f} ({r['lib_on_min']:.2f}-{r['lib_on_max']:.2f}) | {100 * r['lib_cost']:+.1f}% | "
                  f"{r['normalize_s']:.2f} | {r.get('spark_off', float('nan')):.2f} | {r.get('spark_on', float('nan')):.2f} | "
                  f"{100 * r.get('spark_cost', float('nan')):+.1f}% |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"brute_force_s": bf_s, "brute_force_qps": bf_qps, "library_cold_s": cold_s,
                       "verify_s": verify_s, "rows": rows, "normalisation": norm_rows},
                      fh, indent=2)


def normalisation_cost(args, qf: str, idx: str, shortlist: int, nprobe: int) -> list[dict]:
    """Search with and without ``search.normalize`` (a background of unrelated synthetic vectors of
    each size), same queries and index, library runs interleaved."""
    base = [f"search.shortlist={shortlist}", f"search.nprobe={nprobe}"]
    if args.query_chunk:
        base.append(f"search.query_chunk={args.query_chunk}")
    out = []
    for n_bg in [int(x) for x in args.normalize.split(",")]:
        bg = os.path.join(args.workdir, f"background_{n_bg}")
        if not fsio.exists(os.path.join(bg, "_manifest.json")):
            coarse, fine = synthetic.gallery(n_bg, synthetic.SyntheticSpec(seed=99))
            synthetic.write_feature_output(bg, coarse, fine, num_files=1, storage="int8", id_prefix="bg")
        on = base + [f"search.normalize.background={bg}"]
        off_s, on_s, norm_s = [], [], []
        for rep in range(args.repeats):
            off_s.append(run_library(qf, idx, os.path.join(args.workdir, "out", "norm_off"), base))
            on_s.append(run_library(qf, idx, os.path.join(args.workdir, "out", "norm_on"), on))
            m = json.loads(fsio.read_text(os.path.join(args.workdir, "out", "norm_on", "_manifest.json")))
            norm_s.append(m["timings"]["normalize_s"])
        row = {"background": n_bg, "lib_off": float(np.median(off_s)), "lib_on": float(np.median(on_s)),
               "lib_off_min": min(off_s), "lib_off_max": max(off_s), "lib_on_min": min(on_s), "lib_on_max": max(on_s),
               "normalize_s": float(np.median(norm_s))}
        row["lib_cost"] = row["lib_on"] / row["lib_off"] - 1
        if not args.no_spark:
            row["spark_off"] = run_spark(qf, idx, os.path.join(args.workdir, "out", "norm_spark_off"), base)
            row["spark_on"] = run_spark(qf, idx, os.path.join(args.workdir, "out", "norm_spark_on"), on)
            row["spark_cost"] = row["spark_on"] / row["spark_off"] - 1
        log(json.dumps(row))
        out.append(row)
    return out


if __name__ == "__main__":
    main()
