"""Cost of takedowns at 1M (docs/lifecycle.md "Cost"): ``retrieval remove``, the search with
tombstones against the same search without, and ``retrieval index --compact``.

    .venv/bin/python tests/bench/bench_remove.py                       # 1M gallery, 1% removed
    .venv/bin/python tests/bench/bench_remove.py --gallery 100000 --remove 1000 --repeats 2

One run (local engine; the gallery, queries and index come from bench_search.py's ``prepare``,
cached in --workdir): the index is copied (shards only: the features are shared), ``--remove``
gallery ids (the sources of the matching queries first, then random ones) are removed from the
copy and timed; then ``--repeats`` times, alternately, the search of every query against the
original index and against the copy with tombstones (same settings; the ratio is taken inside each
repeat: the machine is shared); every removed id is checked absent from the results; then the
compaction is timed and the compacted index searched once more (its results must equal the
tombstoned ones).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import retrieval  # noqa: E402,F401
from retrieval import config  # noqa: E402
from tests import synthetic  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed_search(qf: str, index: str, out: str, cfg) -> tuple[float, object]:
    from retrieval.search import read_results, search

    t = time.monotonic()
    m = search(qf, index, out, cfg, None, overwrite=True)
    return time.monotonic() - t, (m, read_results(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--match", type=int, default=2_000)
    ap.add_argument("--nomatch", type=int, default=2_000)
    ap.add_argument("--remove", type=int, default=10_000, help="gallery ids removed (default 1%% of 1M)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/remove-bench")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from bench_search import prepare
    from retrieval.index.compact import compact
    from retrieval.remove.job import remove

    args.workdir = os.path.abspath(args.workdir)
    gal, qf, idx, src = prepare(args)
    cfg = config.load()
    copy = idx + "_removed"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(idx, copy)
    rng = np.random.default_rng(0)
    chosen = list(dict.fromkeys([int(s) for s in src if s >= 0][: args.remove // 2]
                                + rng.choice(args.gallery, args.remove, replace=False).tolist()))[: args.remove]
    ids = [synthetic.image_id(i) for i in chosen]
    ids_file = os.path.join(args.workdir, "takedown.txt")
    with open(ids_file, "w") as fh:
        fh.write("\n".join(ids) + "\n")
    t = time.monotonic()
    m = remove(copy, ids_file, cfg)
    remove_s = time.monotonic() - t
    log(f"remove: {len(ids)} ids ({m['takedowns']['tombstoned_rows']} rows) in {remove_s:.1f}s")
    base, tomb, ratios = [], [], []
    timed_search(qf, idx, os.path.join(args.workdir, "res_base"), cfg)      # warm-up (numba, caches)
    for r in range(args.repeats):
        first = r % 2          # alternate which runs first
        if first:
            w, (mt, res) = timed_search(qf, copy, os.path.join(args.workdir, "res_tomb"), cfg)
        b, _ = timed_search(qf, idx, os.path.join(args.workdir, "res_base"), cfg)
        if not first:
            w, (mt, res) = timed_search(qf, copy, os.path.join(args.workdir, "res_tomb"), cfg)
        gone = set(ids) & set(res.column("gallery_id").to_pylist())
        assert not gone, f"removed ids returned: {sorted(gone)[:5]}"
        base.append(b)
        tomb.append(w)
        ratios.append(w / b)
        log(f"repeat {r}: search {b:.1f}s without tombstones, {w:.1f}s with ({w / b:.3f}x)")
    t = time.monotonic()
    mc = compact(copy, cfg)
    compact_s = time.monotonic() - t
    info = mc["takedowns"]["batches"][-1]
    log(f"compact: {info['rows_dropped']} rows, {info['files']} feature files rewritten, {info['shards']} "
        f"shards rebuilt in {compact_s:.1f}s")
    c, (_, resc) = timed_search(qf, copy, os.path.join(args.workdir, "res_compact"), cfg)
    cols = ["query_id", "rank", "gallery_id"]
    order = [(c, "ascending") for c in cols[:2]]
    a, b = resc.select(cols).sort_by(order), res.select(cols).sort_by(order)
    same = a.equals(b)
    differ = (sum(x != y for x, y in zip(a.column("gallery_id").to_pylist(), b.column("gallery_id").to_pylist()))
              if a.num_rows == b.num_rows else None)
    import pyarrow.compute as pc

    r1 = [t.filter(pc.equal(t.column("rank"), 1)).column("gallery_id").to_pylist() for t in (a, b)]
    differ1 = sum(x != y for x, y in zip(*r1)) if len(r1[0]) == len(r1[1]) else None
    out = {"gallery": args.gallery, "queries": args.match + args.nomatch, "removed_ids": len(ids),
           "tombstoned_rows": m["takedowns"]["tombstoned_rows"], "remove_s": round(remove_s, 2),
           "search_s_without": [round(x, 2) for x in base], "search_s_with": [round(x, 2) for x in tomb],
           "ratio_median": round(statistics.median(ratios), 3),
           "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
           "compact_s": round(compact_s, 2), "compact": info, "search_s_compacted": round(c, 2),
           "compacted_results_equal_tombstoned": bool(same),
           "result_rows_differing": differ, "result_rows": b.num_rows, "rank1_differing": differ1, "load_average": os.getloadavg()}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
