"""Benchmark of the two-stage search against exact 512-d brute force (docs/search.md "Benchmark").

    .venv/bin/python tests/bench/bench_search.py                 # 1M gallery, 10k + 10k queries
    .venv/bin/python tests/bench/bench_search.py --gallery 100000 --match 2000 --nomatch 2000 --no-spark-grid
    .venv/bin/python tests/bench/bench_search.py --shortlists 200 --nprobes 16 --normalize 1000,2000,10000

What it does, in one run (fixed seed; the data and index are cached in --workdir and reused when
the sizes match):
1. a synthetic gallery (``tests/synthetic.py``, default ``SyntheticSpec``) written as a real
   extraction output (int8 fine vectors, 8 files), and matching + non-matching queries written as a
   query feature output;
2. the index, built once with ``retrieval.index.build.build_index`` (its default parameters);
3. exact 512-d brute force: faiss ``IndexFlatIP`` over the stored (dequantised) gallery vectors,
   all queries once (the exact lists, cached), then re-timed on ``--brute-sample`` queries in every
   repeat (search only: loading the vectors is not counted, which favours it);
4. the library path (``search(..., engine=None)``) at shortlist 100/500/1000 x two nprobe values, and
   the Spark job end to end (``retrieval search`` in a subprocess: JVM start, planning, writing and
   the manifest included) for the default setting (``--spark-grid``: for every setting);
5. ``--repeats`` times (default 3): brute force re-timed, the library run of every setting, the Spark
   job(s); every ratio is taken inside its repeat and reported as median (min-max) over the repeats,
   with the warm stage times (coarse / merge / rerank / write) and the load average;
6. per setting: queries/s, speed-up over brute force, rank-1 source rate on the matching queries
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

# first: ``import retrieval`` sets OMP_WAIT_POLICY=PASSIVE, which every OpenMP runtime reads once when
# it is loaded (torch's libgomp, which numba's "omp" threading layer then shares, and faiss's copy);
# torch (via read_features) and faiss used to be loaded before it was set, so numba's workers spun
# after every kernel call (see retrieval/__init__.py)
import retrieval  # noqa: E402,F401
from retrieval import config, fsio, outputs  # noqa: E402
from tests import synthetic  # noqa: E402
from retrieval.extract.job import read_features  # noqa: E402
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
    if outputs.marker_of(idx, "index") is None:     # an index cached before 0.2: manifest.json
        from retrieval.index.build import build_index

        t = time.monotonic()
        build_index([gal], idx, config.load(), engine=None)
        log(f"index built in {time.monotonic() - t:.0f}s")
    return gal, qf, idx, np.load(src_file)


class BruteForce:
    """Exact 512-d brute force: faiss ``IndexFlatIP`` over the stored (dequantised) gallery vectors.
    The exact top-k lists of every query are computed once and cached in ``cache_file``; the speed is
    re-measured by :meth:`time_sample` (``sample`` queries, search only) in every repeat, side by side
    with the library and Spark runs it is compared with."""

    def __init__(self, gal: str, qf: str, k: int, cache_file: str, sample: int) -> None:
        import faiss

        xb = fine_matrix(read_features(gal, ["fine", "fine_scale"]))
        q = read_features(qf, ["image_id", "fine", "fine_scale"])
        xq = np.ascontiguousarray(fine_matrix(q))
        self.k = k
        self.index = faiss.IndexFlatIP(xb.shape[1])
        self.index.add(xb)
        del xb
        self.sel = xq[np.random.default_rng(0).choice(len(xq), min(sample, len(xq)), replace=False)]
        self.first_qps = None           # q/s of the all-queries run that made the cache (if this run did)
        if os.path.exists(cache_file):
            d = np.load(cache_file)
            self.rows, self.qids = d["rows"], d["qids"]
            log(f"brute force: exact lists from {cache_file}; speed re-measured on {len(self.sel)} queries "
                f"per repeat")
        else:
            t = time.monotonic()
            _, self.rows = self.index.search(xq, k)
            self.first_qps = len(xq) / (time.monotonic() - t)
            self.qids = np.array(q.column("image_id").to_pylist())
            np.savez(cache_file, rows=self.rows, qids=self.qids)
            log(f"brute force: all {len(xq)} queries at {self.first_qps:.1f} q/s (exact lists cached)")

    def time_sample(self) -> float:
        """Brute-force q/s now, on the fixed sample of queries."""
        t = time.monotonic()
        self.index.search(self.sel, self.k)
        return len(self.sel) / (time.monotonic() - t)

    def close(self) -> None:
        self.index = None


def load() -> float:
    return round(os.getloadavg()[0], 2)


def summary(values: list[float], digits: int = 2) -> dict:
    """median, min, max (and the values) of one measurement across repeats."""
    v = [float(x) for x in values]
    return {"median": round(float(np.median(v)), digits), "min": round(min(v), digits),
            "max": round(max(v), digits), "runs": [round(x, digits) for x in v]}


def fmt(s: dict, unit: str = "", digits: int = 1) -> str:
    """``median (min-max)``."""
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def threading_info() -> str:
    """The thread and OpenMP settings the measurements run with (after the first search)."""
    import faiss
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:               # no parallel kernel has run yet
        layer = "not initialised"
    return (f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, faiss OpenMP threads "
            f"{faiss.omp_get_max_threads()}, numba {numba.__version__} threading layer {layer} with "
            f"{numba.get_num_threads()} threads, torch loaded {'torch' in sys.modules}, cpus {os.cpu_count()}")


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
    search(qf, idx, out, cfg, engine=None)
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
    ap.add_argument("--spark-baseline", default="",
                    help="comma-separated key=value settings of a second Spark job at the default setting, run "
                         "right after the first in every repeat (side by side), e.g. "
                         "spark.fast_start=false,io.verified_record=none: the fixed costs before issue 25")
    ap.add_argument("--brute-sample", type=int, default=2000,
                    help="queries brute force is re-timed on in every repeat")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--normalize", default="", help="background sizes (e.g. 2000,10000): the cost of score "
                                                    "normalisation at the default setting, library and Spark job")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed repeats: each re-times brute force, then runs the library at every setting and the "
                         "Spark job(s); ratios are per repeat, reported as median (min-max) (--normalize: "
                         "library runs per variant, interleaved)")
    args = ap.parse_args()
    repeats = max(1, args.repeats)

    log(f"load average {load()} at the start (1 min; {os.cpu_count()} cores)")
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

    bf = BruteForce(gal, qf, 10, os.path.join(os.path.dirname(gal), "exact_top10.npz"), args.brute_sample)
    exact_rows, qids = bf.rows, bf.qids

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
    log(f"threads: {threading_info()}")

    settings = []
    for nprobe in nprobes:
        for S in shortlists:
            sets = [f"search.shortlist={S}", f"search.nprobe={nprobe}"]
            if args.query_chunk:
                sets.append(f"search.query_chunk={args.query_chunk}")
            is_default = S == default_shortlist and nprobe == default_nprobe
            settings.append({"shortlist": S, "nprobe": nprobe, "sets": sets, "default": is_default,
                             "spark": not args.no_spark and (args.spark_grid or is_default),
                             "out": os.path.join(args.workdir, "out", f"lib_s{S}_p{nprobe}"),
                             "sout": os.path.join(args.workdir, "out", f"spark_s{S}_p{nprobe}"),
                             "lib_s": [], "spark_s": [], "base_s": [], "stages": [], "bf_s": [], "load": []})
    # every repeat measures brute force, then every setting's library run, then the Spark runs, so a
    # ratio compares measurements taken minutes apart at most, and the spread of the ratios across
    # repeats shows how much the machine's load moved them
    bf_qps_runs = []
    for rep in range(repeats):
        bf_qps = bf.time_sample()
        bf_qps_runs.append(bf_qps)
        log(f"repeat {rep + 1}/{repeats}: brute force {bf_qps:.1f} q/s (load {load()})")
        for st in settings:
            lib_s = run_library(qf, idx, st["out"], st["sets"])
            timings = json.loads(fsio.read_text(os.path.join(st["out"], "_manifest.json")))["timings"]
            st["lib_s"].append(lib_s)
            st["bf_s"].append(n_q / bf_qps)
            st["load"].append(load())
            st["stages"].append({k: timings.get(k) for k in ("coarse_s", "merge_s", "rerank_s", "write_s")})
        for st in settings:
            if st["spark"]:
                st["spark_s"].append(run_spark(qf, idx, st["sout"], st["sets"]))
                if args.spark_baseline and st["default"]:
                    st["base_s"].append(run_spark(qf, idx, st["sout"] + "_base",
                                                  st["sets"] + args.spark_baseline.split(",")))
                    log(f"repeat {rep + 1}: Spark job {st['spark_s'][-1]:.1f}s, with {args.spark_baseline} "
                        f"{st['base_s'][-1]:.1f}s")
        log(f"repeat {rep + 1}/{repeats}: " + "; ".join(
            f"S {st['shortlist']} nprobe {st['nprobe']}: library {st['lib_s'][-1]:.2f}s "
            f"({st['bf_s'][-1] / st['lib_s'][-1]:.0f}x)" +
            (f", Spark {st['spark_s'][-1]:.1f}s ({st['bf_s'][-1] / st['spark_s'][-1]:.1f}x)" if st["spark"] else "")
            for st in settings) + f" (load {load()})")
    bf.close()

    rows = []
    for st in settings:
        lib_speedups = [b / x for b, x in zip(st["bf_s"], st["lib_s"])]
        row = {"shortlist": st["shortlist"], "nprobe": st["nprobe"], "default": st["default"],
               "library_s": summary(st["lib_s"]), "library_qps": summary([n_q / x for x in st["lib_s"]], 0),
               "library_speedup": summary(lib_speedups, 1),
               "stages_s": {k: summary([r[k] for r in st["stages"]], 3)
                            for k in ("coarse_s", "merge_s", "rerank_s", "write_s")},
               "load": st["load"], **score(two_stage_rows(st["out"]), qids, source, exact_rows)}
        if st["spark"]:
            spark_speedups = [b / x for b, x in zip(st["bf_s"], st["spark_s"])]
            row.update({"spark_s": summary(st["spark_s"]), "spark_qps": summary([n_q / x for x in st["spark_s"]], 0),
                        "spark_speedup": summary(spark_speedups, 1),
                        "spark_equals_library": two_stage_rows(st["sout"]) == two_stage_rows(st["out"])})
            if st["base_s"]:
                row.update({"baseline_sets": args.spark_baseline, "baseline_s": summary(st["base_s"]),
                            "baseline_speedup": summary([b / x for b, x in zip(st["bf_s"], st["base_s"])], 1)})
        rows.append(row)
        log(json.dumps(row))
    bf_summary = summary(bf_qps_runs, 1)

    print()
    print(f"threads: {threading_info()}")
    print(f"warm stage seconds (library, {n_q:,} queries), median (min-max) of {repeats} repeats:")
    for r in rows:
        print(f"  shortlist {r['shortlist']}, nprobe {r['nprobe']}: " +
              ", ".join(f"{k[:-2]} {fmt(v, digits=3)}" for k, v in r["stages_s"].items()))
    norm_rows = normalisation_cost(args, qf, idx, default_shortlist, default_nprobe) if args.normalize else []

    print()
    bf_s_med = n_q / bf_summary["median"]
    print(f"gallery {args.gallery:,}, queries {n_q:,} ({args.match:,} matching), {os.cpu_count()} cores; "
          f"brute force (faiss IndexFlatIP, 512-d) {fmt(bf_summary)} q/s on {len(bf.sel):,} queries per repeat "
          f"({bf_s_med:.0f}s for all at the median)" +
          (f", {bf.first_qps:.1f} q/s on all of them in this run" if bf.first_qps else "") +
          f"; library first call (cold caches) {n_q / cold_s:.0f} q/s ({bf_s_med / cold_s:.0f}x); library rows: "
          f"warm caches, without the per-run sha256 check of the index and gallery files ({verify_s:.1f}s); "
          f"Spark rows: the whole job in a new process with defaults (JVM start and the check included)")
    print()
    print(f"{repeats} repeats, each: brute force re-timed, then the library run of every setting, then the Spark "
          f"job(s); each ratio is taken within its repeat. Figures: median (min-max) over the repeats; load "
          f"average (1 min) at the library runs: {min(min(r['load']) for r in rows):.2f}-"
          f"{max(max(r['load']) for r in rows):.2f}")
    print()
    print("| shortlist | nprobe | library q/s | x brute | Spark job q/s | x brute | rank-1 two-stage | "
          "rank-1 exact | exact's rank-1 kept | recall@10 vs exact |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        sp = f"{fmt(r['spark_qps'], digits=0)} | {fmt(r['spark_speedup'], 'x')}" if "spark_qps" in r else "- | -"
        print(f"| {r['shortlist']}{' (default)' if r['default'] else ''} | {r['nprobe']} | "
              f"{fmt(r['library_qps'], digits=0)} | {fmt(r['library_speedup'], 'x', 0)} | {sp} | "
              f"{100 * r['rank1_two_stage']:.2f}% | {100 * r['rank1_exact']:.2f}% | "
              f"{100 * r['rank1_retained']:.2f}% | {100 * r['recall10_vs_exact']:.2f}% |")
    for r in rows:
        if "baseline_s" in r:
            print(f"\nSpark job at the default, side by side in every repeat: {fmt(r['spark_s'])} s "
                  f"({fmt(r['spark_speedup'], 'x')} brute force); with {r['baseline_sets']}: "
                  f"{fmt(r['baseline_s'])} s ({fmt(r['baseline_speedup'], 'x')})")
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
            json.dump({"brute_force_qps": bf_summary, "brute_force_first_qps": bf.first_qps,
                       "library_cold_s": cold_s, "verify_s": verify_s, "threads": threading_info(),
                       "repeats": repeats, "rows": rows, "normalisation": norm_rows}, fh, indent=2)


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
