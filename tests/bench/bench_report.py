"""Audit report at scale: a search output of N queries x k matches (synthetic scores, real Parquet
with the results schema and manifest), reported with thumbnails off; prints rows/s of the
streaming scan and the peak memory, to show that memory follows the batch size, not the rows.

    .venv/bin/python tests/bench/bench_report.py --queries 500000 --k 10
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import config, fsio
from retrieval.report import build_report
from retrieval.schema import conform_results


def write_results(root: str, n_queries: int, k: int, files: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    per_file = -(-n_queries // files)
    entries = []
    for f in range(files):
        q0, q1 = f * per_file, min(n_queries, (f + 1) * per_file)
        n = q1 - q0
        if n <= 0:
            break
        # a best score per query (5% are copies, ~0.9), then decreasing scores down the ranks
        best = np.where(rng.random(n) < 0.05, rng.uniform(0.8, 1.0, n), rng.uniform(0.3, 0.75, n))
        scores = (best[:, None] - np.sort(rng.uniform(0, 0.2, (n, k)), axis=1)).astype(np.float32).ravel()
        qids = np.repeat(np.arange(q0, q1), k)
        table = conform_results(pa.table({     # the other columns null (signal "descriptor"), as the search writes them
            "query_id": pa.array([f"q{i:09d}" for i in qids]),
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), n)),
            "gallery_id": pa.array([f"g{i:09d}" for i in rng.integers(0, 10**8, n * k)]),
            "score": pa.array(scores), "coarse_score": pa.array(scores - 0.05),
            "query_uri": pa.array([f"s3://bucket/q/{i}.jpg" for i in qids]),
            "gallery_uri": pa.array(["s3://bucket/g/x.jpg"] * (n * k)),
        }))
        name = f"part-{f:05d}.parquet"
        pq.write_table(table, os.path.join(root, name))
        entries.append({"file": name, "rows": table.num_rows, "sha256": fsio.sha256_file(os.path.join(root, name))})
    rows = sum(e["rows"] for e in entries)
    fsio.write_json(os.path.join(root, "_manifest.json"), {
        "stage": "search", "model_version": "bench", "index": None, "query_features": None,
        "counts": {"queries": n_queries, "query_errors": 0, "queries_with_results": n_queries, "rows": rows},
        "files": entries, "timings": {}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=500_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--files", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = os.path.join(tmp, "results")
        os.makedirs(res)
        t = time.monotonic()
        # generated in a child process, so that this process's peak memory is the report's own
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = pool.submit(write_results, res, args.queries, args.k, args.files).result()
        print(f"wrote {rows:,} result rows in {time.monotonic() - t:.1f}s "
              f"({sum(os.path.getsize(os.path.join(res, f)) for f in os.listdir(res)) / 1e6:.0f} MB)")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cfg = config.load(overrides={"report.thumbnails": "none"})
        t = time.monotonic()
        summary = build_report(res, os.path.join(tmp, "report"), cfg)
        wall = time.monotonic() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"rows": rows, "report_s": round(wall, 2),
                          "scan_rows_per_s": summary["timings"]["rows_per_s"],
                          "flagged_matches": summary["counts"]["flagged_matches"],
                          "flagged_queries": summary["counts"]["flagged_queries"],
                          "peak_rss_mb_before_report": round(rss_before), "peak_rss_mb": round(peak),
                          "summary_json_bytes": len(json.dumps(summary)),
                          "html_bytes": os.path.getsize(os.path.join(tmp, "report", "report.html"))}, indent=1))


if __name__ == "__main__":
    main()
