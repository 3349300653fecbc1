"""Benchmark: our sharded index build (Spark local[2]) vs autofaiss, same vectors, same memory budget.

    .venv/bin/python tests/bench/bench_index.py                 # 1,000,000 gallery items, 10,000 queries
    .venv/bin/python tests/bench/bench_index.py --n 100000 --queries 2000   # quick check

Data: ``tests/synthetic.py`` with the default ``SyntheticSpec`` (seed 0): N gallery items written
as a real extraction output (8 feature files), and ``--queries`` perturbed copies of known items
(the same generator as the search benchmark). The coarse vectors are also saved as .npy for
autofaiss.

Build time: inside each child, around the build call (ours: Spark session start + ``build_index``,
which includes the build-time quality step; autofaiss: ``build_index``, which includes its own
hyper-parameter tuning). Each build runs in its own child process (ours: ``build_index`` on a fresh Spark ``local[2]``
session; autofaiss 2.18: ``autofaiss.build_index`` with ``nb_cores=2`` in the separate venv
``--autofaiss-python``, default ``.bench-venv``: ``python3 -m venv .bench-venv &&
.bench-venv/bin/pip install autofaiss faiss-cpu==1.13.2 'pyarrow<17'``). Wall time and the peak
resident memory of the whole process tree (driver, JVM, Python workers) are sampled from /proc
by this script. Both run with ``OMP_WAIT_POLICY=PASSIVE`` (the machine's cores are shared).

Quality, computed here identically for both from each index's top-500 at its default search
parameters: recall@10 / recall@100 against exact 128-d inner-product search (k-NN intersection),
and the share of queries whose true source is in the top-500 shortlist (with the exact figure
for reference). Results are printed and written to ``<workdir>/results.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

import retrieval.index  # noqa: E402,F401  (before faiss: sets OMP_WAIT_POLICY)
import numpy as np  # noqa: E402

SHORTLIST = 500


# ---------------------------------------------------------------------------------------------
# process-tree memory sampling (no psutil in the project venv)
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree_rss(pid: int) -> int:
    kids, total, todo = _children(), 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
        todo.extend(kids.get(p, []))
    return total


def run_measured(cmd: list[str], env: dict | None = None, log_path: Path | None = None) -> dict:
    """Run ``cmd``; wall time and peak RSS of its whole process tree (sampled every 0.2 s)."""
    t0 = time.monotonic()
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            stop.wait(0.2)

    loads = []

    def load_avg():
        while not stop.is_set():
            with open("/proc/loadavg") as fh:
                loads.append(float(fh.read().split()[0]))
            stop.wait(5.0)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    tl = threading.Thread(target=load_avg, daemon=True)
    tl.start()
    rc = proc.wait()
    stop.set()
    th.join()
    tl.join()
    if log_path:
        out.close()
    if rc != 0:
        tail = log_path.read_text()[-3000:] if log_path else ""
        raise RuntimeError(f"{cmd[:3]} failed with exit code {rc}\n{tail}")
    return {"wall_s": round(time.monotonic() - t0, 1), "peak_rss_mb": round(peak[0] / 2**20, 1),
            "load_avg": round(float(np.mean(loads)), 1) if loads else None}


# ---------------------------------------------------------------------------------------------
def prepare(work: Path, n: int, nq: int) -> None:
    """Feature output, .npy copies, queries and exact ground truth (cached in ``work``)."""
    from tests import synthetic

    meta = {"n": n, "queries": nq, "spec": repr(synthetic.SyntheticSpec())}
    if (work / "data.json").exists() and json.loads((work / "data.json").read_text()) == meta:
        return
    import faiss

    t = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    coarse, fine = synthetic.gallery(n)
    synthetic.write_feature_output(str(work / "features"), coarse, fine, num_files=8)
    del fine
    (work / "npy").mkdir(exist_ok=True)
    np.save(work / "npy" / "coarse.npy", coarse)
    qc, _, src = synthetic.queries(n, nq, 0)
    np.save(work / "xq.npy", qc)
    np.save(work / "src.npy", src)
    print(f"data: {n} gallery items, {nq} queries written in {time.monotonic() - t:.0f}s", flush=True)
    # exact top-SHORTLIST (inner product) of every query over all gallery vectors, in chunks
    t = time.monotonic()
    best_d = np.full((nq, SHORTLIST), -np.inf, np.float32)
    best_i = np.full((nq, SHORTLIST), -1, np.int64)
    for a in range(0, n, 200_000):
        d, i = faiss.knn(qc, coarse[a:a + 200_000], SHORTLIST, metric=faiss.METRIC_INNER_PRODUCT)
        dd = np.concatenate([best_d, d], axis=1)
        ii = np.concatenate([best_i, i + a], axis=1)
        o = np.argsort(-dd, axis=1, kind="stable")[:, :SHORTLIST]
        best_d, best_i = np.take_along_axis(dd, o, 1), np.take_along_axis(ii, o, 1)
    np.save(work / "gt.npy", best_i)
    print(f"exact ground truth in {time.monotonic() - t:.0f}s", flush=True)
    (work / "data.json").write_text(json.dumps(meta))


def _ours_child(work: Path, master: str, budget_mb: float, n: int) -> None:
    """(child process) build our index with Spark and save the top-500 of the queries."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from retrieval import config
    from retrieval.index import store
    from retrieval.index.build import build_index
    from retrieval.engine.session import get_spark

    t0 = time.monotonic()
    spark = get_spark(master, "bench-index", {"spark.ui.enabled": "false"})
    t1 = time.monotonic()
    bpv = int(budget_mb * 2**20 / n)
    cfg = config.load(sets=[f"index.bytes_per_vector={bpv}", "index.mode=overwrite"])
    m = build_index([str(work / "features")], str(work / "ours"), cfg, spark)
    t2 = time.monotonic()
    spark.stop()
    xq = np.load(work / "xq.npy")
    t3 = time.monotonic()
    _, ids = store.search_shards(str(work / "ours"), xq, SHORTLIST)
    search_s = time.monotonic() - t3
    from retrieval.index import idmap

    # gallery row = position in the concatenated feature files (they are contiguous slices)
    files, rows = idmap.decode_ids(ids)
    starts = np.cumsum([0] + [f["rows"] for f in m["feature_files"]])
    gid = np.where(ids >= 0, starts[np.clip(files, 0, len(starts) - 2)] + rows, -1)
    np.save(work / "ours_top.npy", gid)
    disk = sum(p.stat().st_size for p in (work / "ours").iterdir() if p.is_file())
    (work / "ours.json").write_text(json.dumps({
        "spark_start_s": round(t1 - t0, 1), "build_s": round(t2 - t1, 1), "search_s": round(search_s, 1),
        "index_key": m["index_key"], "nprobe": m["nprobe"], "shards": len(m["shards"]),
        "bytes_per_vector": round(disk / n, 2), "bytes_per_vector_budget": bpv,
        "timings": m["timings"], "train_sample_size": m["train_sample_size"],
        "build_quality": {k: v for k, v in m["quality"].items() if k != "by_nprobe"}}))


AUTOFAISS_CHILD = r"""
import json, os, sys, time
import numpy as np
import faiss
from autofaiss import build_index
work, budget, cores = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.monotonic()
index, infos = build_index(embeddings=os.path.join(work, "npy"), index_path=os.path.join(work, "autofaiss.index"),
                           index_infos_path=os.path.join(work, "autofaiss_infos.json"),
                           max_index_memory_usage=budget, current_memory_available="8G",
                           metric_type="ip", nb_cores=cores, save_on_disk=True)
build_s = time.monotonic() - t0
if index is None:
    sys.exit("autofaiss returned no index")
xq = np.load(os.path.join(work, "xq.npy"))
t = time.monotonic()
_, ids = index.search(xq, 500)
np.save(os.path.join(work, "autofaiss_top.npy"), ids)
json.dump({"build_s": round(build_s, 1), "search_s": round(time.monotonic() - t, 1),
           "index_key": infos.get("index_key"), "index_param": infos.get("index_param"),
           "bytes_per_vector": round(os.path.getsize(os.path.join(work, "autofaiss.index")) / index.ntotal, 2),
           "infos": {k: str(v) for k, v in infos.items()}}, open(os.path.join(work, "autofaiss.json"), "w"))
"""


def quality(top: np.ndarray, gt: np.ndarray, src: np.ndarray) -> dict:
    def inter(k):
        return float(np.mean([len(np.intersect1d(top[r, :k], gt[r, :k])) / k for r in range(len(top))]))

    return {"recall@10": round(inter(10), 4), "recall@100": round(inter(100), 4),
            "top500_hit": round(float((top[:, :SHORTLIST] == src[:, None]).any(axis=1).mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--workdir", default="/tmp/bench_index")
    ap.add_argument("--budget-mb", type=float, default=64.0, help="memory budget of the index, both builds")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--cores", type=int, default=2, help="autofaiss nb_cores")
    ap.add_argument("--autofaiss-python", default=str(ROOT / ".bench-venv" / "bin" / "python"))
    ap.add_argument("--skip-autofaiss", action="store_true")
    ap.add_argument("--child", choices=("ours",), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    if args.child == "ours":
        _ours_child(work, args.master, args.budget_mb, args.n)
        return 0

    prepare(work, args.n, args.queries)
    gt, src = np.load(work / "gt.npy"), np.load(work / "src.npy")
    results = {"n": args.n, "queries": args.queries, "budget_mb": args.budget_mb, "master": args.master,
               "cpus": os.cpu_count(), "exact": quality(gt, gt, src)}
    print(f"ours: build_index on Spark {args.master} ...", flush=True)
    ours = run_measured([sys.executable, __file__, "--child", "ours", "--n", str(args.n), "--workdir", str(work),
                         "--master", args.master, "--budget-mb", str(args.budget_mb)],
                        log_path=work / "ours.log")
    ours.update(json.loads((work / "ours.json").read_text()))
    ours["build_total_s"] = round(ours["spark_start_s"] + ours["build_s"], 1)
    ours.update(quality(np.load(work / "ours_top.npy"), gt, src))
    results["ours"] = ours
    print(json.dumps(ours, indent=1), flush=True)
    if not args.skip_autofaiss:
        print(f"autofaiss (nb_cores={args.cores}, max_index_memory_usage={args.budget_mb:g}MB) ...", flush=True)
        af = run_measured([args.autofaiss_python, "-c", AUTOFAISS_CHILD, str(work), f"{args.budget_mb:g}MB",
                           str(args.cores)], log_path=work / "autofaiss.log")
        af.update(json.loads((work / "autofaiss.json").read_text()))
        af["build_total_s"] = af["build_s"]
        af.update(quality(np.load(work / "autofaiss_top.npy"), gt, src))
        results["autofaiss"] = af
        print(json.dumps({k: v for k, v in af.items() if k != "infos"}, indent=1), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))

    # summary
    rows = [("exact 128-d", results["exact"], None)]
    rows.append(("ours (Spark)", ours, ours))
    if "autofaiss" in results:
        rows.append(("autofaiss", results["autofaiss"], results["autofaiss"]))
    print(f"\n{args.n:,} gallery vectors, {args.queries:,} queries, budget {args.budget_mb:g} MB, {os.cpu_count()} CPUs "
          f"(1-min load average during the builds: ours {ours['load_avg']}"
          + (f", autofaiss {results['autofaiss']['load_avg']})" if "autofaiss" in results else ")"))
    print(f"{'':14} {'build s':>7} {'peak MB':>8} {'B/vec':>6} {'recall@10':>9} {'recall@100':>10} "
          f"{'top500 hit':>10}  index")
    for name, q, r in rows:
        if r is None:
            print(f"{name:14} {'':>7} {'':>8} {'':>6} {q['recall@10']:>9.4f} {q['recall@100']:>10.4f} "
                  f"{q['top500_hit']:>10.4f}")
        else:
            key = f"{r['index_key']} nprobe={r.get('nprobe', '')}" if name.startswith("ours") else \
                f"{r['index_key']} {r.get('index_param', '')}"
            print(f"{name:14} {r['build_total_s']:>7.1f} {r['peak_rss_mb']:>8.0f} {r['bytes_per_vector']:>6.1f} "
                  f"{q['recall@10']:>9.4f} {q['recall@100']:>10.4f} {q['top500_hit']:>10.4f}  {key}")
    if "autofaiss" in results:
        af = results["autofaiss"]
        print(f"build speed-up (ours incl. Spark session start): {af['build_total_s'] / ours['build_total_s']:.1f}x; "
              f"top-500 hit: ours {100 * ours['top500_hit']:.2f}% vs autofaiss {100 * af['top500_hit']:.2f}% "
              f"({100 * (ours['top500_hit'] - af['top500_hit']):+.2f} points); "
              f"ours {ours['bytes_per_vector']:.1f} B/vector on disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
