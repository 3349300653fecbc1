"""Old (feature-file blocks) vs new (list-ordered fine copy) gallery-major rerank, side by side in
one run: read volumes (from the search manifests' io counters) and wall times, identical rows checked.
The per-process cache of query vectors is cut to one chunk, so each block task reads the query
chunks it needs as it would on its own executor (in one local process the blocks would share them).

    python tests/bench/bench_fine_by_list.py --gallery 1000000 --queries 16384 --cache-mb 8 --workdir /tmp/x [--engine spark]

At a billion a 1 GiB block holds ~10 MB of each of 100 shard copies (20 row groups); keep a block's
share of a shard (cache MB / shards) at several 0.5 MB row groups here too, or the row groups read
at block edges dominate the gallery reads.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from retrieval import config  # noqa: E402
from retrieval.index.build import build_index  # noqa: E402
from retrieval.search import read_results, search  # noqa: E402
from tests import synthetic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gallery", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=8192)
    ap.add_argument("--workdir", default="/tmp/bench-fine-by-list")
    ap.add_argument("--cache-mb", type=int, default=4, help="search.vector_cache_mb (the block size)")
    ap.add_argument("--engine", choices=("local", "spark"), default="local")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vectors-per-shard", type=int, default=500_000, help="index.vectors_per_shard")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    spec = synthetic.SyntheticSpec(n_clusters=max(100, args.gallery // 100), seed=7)
    gc, gf = synthetic.gallery(args.gallery, spec)
    gal = os.path.join(args.workdir, "gallery")
    synthetic.write_feature_output(gal, gc, gf, num_files=8)
    qc, qf, _ = synthetic.queries(args.gallery, args.queries // 2, args.queries - args.queries // 2, spec)
    regions = [None if i % 5 < 2 else "center70:0.15,0.15,0.85,0.85" for i in range(len(qc))]
    regions[0] = None
    qurl = os.path.join(args.workdir, "queries")
    synthetic.write_feature_output(qurl, qc, qf, num_files=2, role="query", id_prefix="q", regions=regions)
    from retrieval.search import blocks as blocks_mod
    blocks_mod.QUERY_CACHE_BYTES = 1          # one chunk kept: a block task reads what it needs
    engine = None
    if args.engine == "spark":
        from retrieval.engine.session import get_spark
        engine = get_spark()
    idx = os.path.join(args.workdir, "index")
    t = time.monotonic()
    m = build_index([gal], idx, config.load(sets=[f"index.vectors_per_shard={args.vectors_per_shard}"]), engine)
    build_s = time.monotonic() - t
    out: dict = {"gallery": args.gallery, "query_rows": len(qc), "index_build_s": round(build_s, 1),
                 "index_key": m["params"]["index_key"], "nlist": m["params"]["nlist"], "shards": len(m["shards"]),
                 "copy_bytes": sum(s["fine_by_list"]["bytes"] for s in m["shards"]), "runs": []}
    rows = {}
    for rep in range(args.repeats):
        for layout in ("files", "lists"):
            o = os.path.join(args.workdir, f"out-{layout}")
            cfg = config.load(sets=["search.rerank=gallery", f"search.fine_layout={layout}",
                                    f"search.vector_cache_mb={args.cache_mb}", "search.query_chunk=1024"])
            t = time.monotonic()
            r = search(qurl, idx, o, cfg, engine, overwrite=True)
            wall = time.monotonic() - t
            rows[layout] = read_results(o).to_pylist()
            io = r["io"]
            out["runs"].append({"layout": layout, "repeat": rep, "wall_s": round(wall, 2), "blocks": r["params"]["blocks"],
                                **{k: io.get(k) for k in ("gallery_fine_bytes_read", "gallery_fine_column_bytes",
                                                          "gallery_fine_reads_per_column", "query_fine_bytes_read",
                                                          "query_fine_bytes_shuffled", "pairs_scored")},
                                "query_side_bytes": (io.get("query_fine_bytes_read") or 0)
                                + (io.get("query_fine_bytes_shuffled") or 0)})
        out["identical_rows"] = rows["files"] == rows["lists"]
    for layout in ("files", "lists"):
        runs = [r for r in out["runs"] if r["layout"] == layout]
        out[f"median_wall_s_{layout}"] = sorted(r["wall_s"] for r in runs)[len(runs) // 2]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
