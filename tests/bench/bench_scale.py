"""Scale benchmark (issue 6): a 10,000,000-vector synthetic gallery through the index build and a
10,000-query search on this machine (24 GiB RAM, 2 shared cores).

    .venv/bin/python tests/bench/bench_scale.py                       # 10M gallery, 5k + 5k queries
    nohup .venv/bin/python tests/bench/bench_scale.py > /tmp/bench_scale.log 2>&1 &
    .venv/bin/python tests/bench/bench_scale.py --n 300000 --match 500 --nomatch 500 --exact-sample 200  # quick

Resumable: every step leaves a completion marker in ``--workdir`` and is skipped when it is there
(gallery parts and queries: their ``_manifest.json``; index: ``_manifest.json``; search:
``_manifest.json``; measurements: ``*.json`` beside them), so a killed run is restarted by running
the same command again.

1. **gallery**: N rows of ``tests/synthetic.py`` (default ``SyntheticSpec``, seed 0: 128-d coarse +
   512-d fine, stored int8 as extraction does), written as ``--parts`` complete feature outputs of
   N / parts rows each (``synthetic.gallery_chunks(first=...)``): at most one part's vectors are in
   memory at a time.
2. **queries**: ``--match`` perturbed copies of known gallery rows and ``--nomatch`` fresh items
   (``synthetic.queries``), as a query feature output.
3. **index**: ``retrieval index --engine local`` (every default: the index parameters
   come from N and the memory budget) in a child process.
4. **search**: ``retrieval search --engine local`` (defaults: shortlist by gallery size --
   ``search.shortlist`` 0, 1,050 at 10M --, k 10, ``search.nprobe``) in a child process; then again
   at ``--extra-shortlist`` (500, the patent's value, for comparison). The local engine is the same
   task code the Spark job runs (tested equal, row for row); it is used here because on one 2-core
   machine Spark only adds a JVM.
5. **exact**: brute-force 512-d inner product over every stored (dequantised int8) gallery vector
   for a fixed-seed sample of ``--exact-sample`` queries (``evaluate.exact_search``), in a child.
6. **coarse diagnosis**, same sample: where a missed source is lost. The exact 128-d top-S over all
   gallery coarse codes (float32 brute force: the best ANY coarse index can do with these codes) and
   the IVF-PQ index's top-S at the search's nprobe (``store.search_shards``), for S = 100 ... 5000.
--locality CACHE_MB,CHUNK (with --locality-only: only this, after the index): the rerank's read
pattern with a vector cache far below the fine column - chunk-major once, then gallery-major over
feature-file blocks (``search.fine_layout=files``) and over IVF lists of the list-ordered fine copy
(``lists``), alternated ``--locality-rounds`` times, the query-vector cache cut to one chunk so each
block reads the query chunks it needs as on its own executor: query-side and gallery bytes, wall,
rows identical (else exit 1), and the copy's bytes and write time (``--copy-shards`` rewritten);
``<workdir>/locality_C_Q.json``.

7. **coarse rates** (for ``retrieval plan``): on one index shard, flat-quantizer assignment
   (multiply-adds/s), PQ code scanning (the same search at nprobe 1 and 128: extra codes / extra
   time), and the HNSW32 quantizer a billion-vector index gets (131,072 centroids, 256 cells per
   query): queries/s. Per core = divided by faiss's threads (both cores).

Figures (printed and written to ``<workdir>/results.json``): wall time and peak resident memory of
the whole process tree (sampled from /proc every 0.2 s) per stage, with the load average (the
machine is shared); bytes per vector of the features and of the index on disk; the index's
build-time quality; recall@10 of the two-stage top-10 against the exact top-10 on the sample; the
rank-1 rate of the true source over all matching queries (and exact search's on the sample).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

import retrieval.index  # noqa: E402,F401  (before faiss: sets OMP_WAIT_POLICY)
import numpy as np  # noqa: E402

from bench_index import run_measured  # noqa: E402  (wall time + peak RSS of a process tree)

PY = sys.executable
BYTES_PER_ROW = 1240     # a gallery row on disk: int8 fine + float32 coarse + ids, zstd (measured)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def measured(step: str, work: Path, cmd: list[str]) -> dict:
    """Run ``cmd`` measured, once: its figures are kept in ``<work>/<step>.json``."""
    out = work / f"{step}.json"
    if out.exists():
        log(f"{step}: done earlier ({out})")
        return json.loads(out.read_text())
    log(f"{step}: {' '.join(c if len(c) < 200 else '<script>' for c in cmd[:4])} ... (log: {work / (step + '.log')}), load {load()}")
    before = load()
    r = run_measured(cmd, log_path=work / f"{step}.log")
    r.update({"load_before": before, "load_after": load()})
    out.write_text(json.dumps(r))
    log(f"{step}: {r}")
    return r


# ---------------------------------------------------------------------------------------------
def wait_for_disk(path: Path, need: int, margin: int = 3 << 30, patience_s: float = 3600) -> None:
    """The disk is shared: wait (up to ``patience_s``) until ``need`` bytes + a margin are free."""
    t0 = time.monotonic()
    while True:
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
        if free >= need + margin:
            return
        if time.monotonic() - t0 > patience_s:
            raise SystemExit(f"{path}: {free / 2**30:.1f} GiB free, {(need + margin) / 2**30:.1f} GiB needed")
        log(f"waiting for disk: {free / 2**30:.1f} GiB free, {(need + margin) / 2**30:.1f} GiB needed")
        time.sleep(60)


def write_gallery(work: Path, n: int, parts: int) -> tuple[list[str], dict]:
    from tests import synthetic

    step = n // parts
    if step % synthetic.CHUNK:
        raise SystemExit(f"--n / --parts must be a multiple of {synthetic.CHUNK}")
    urls, t0, written = [], time.monotonic(), 0
    for p in range(parts):
        url = work / "gallery" / f"part{p:03d}"
        urls.append(str(url))
        if (url / "_manifest.json").exists():
            continue
        a, b = p * step, (p + 1) * step if p < parts - 1 else n
        wait_for_disk(work, (n - a) * BYTES_PER_ROW)
        coarse = np.empty((b - a, synthetic.COARSE_DIM), np.float32)
        fine = np.empty((b - a, synthetic.FINE_DIM), np.float32)
        for start, c, f in synthetic.gallery_chunks(b, first=a):
            coarse[start - a:start - a + len(c)], fine[start - a:start - a + len(f)] = c, f
        synthetic.write_feature_output(str(url), coarse, fine, num_files=2, start=a)
        written += b - a
        log(f"gallery part {p + 1}/{parts}: rows {a:,}..{b:,} ({time.monotonic() - t0:.0f}s)")
        del coarse, fine
    return urls, {"rows_written_now": written, "seconds": round(time.monotonic() - t0, 1)}


def write_queries(work: Path, n: int, match: int, nomatch: int) -> tuple[str, np.ndarray]:
    from tests import synthetic

    url, src = work / "queries", work / "sources.npy"
    if not (url / "_manifest.json").exists():
        t = time.monotonic()
        qc, qf, source = synthetic.queries(n, match, nomatch)
        synthetic.write_feature_output(str(url), qc, qf, num_files=2, role="query", id_prefix="q")
        np.save(src, source)
        log(f"queries: {match} copies + {nomatch} non-matching in {time.monotonic() - t:.0f}s")
    return str(url), np.load(src)


EXACT_CHILD = r"""
import json, sys, time
import retrieval.index
import numpy as np
from retrieval.evaluate import exact_search
from retrieval.extract.job import read_features
from retrieval.index import store
from retrieval.schema import fine_matrix
work, queries, index, sample_n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
qt = read_features(queries, ["image_id", "fine", "fine_scale"])
pick = np.sort(np.random.default_rng(0).choice(qt.num_rows, size=min(sample_n, qt.num_rows), replace=False))
files = store.feature_file_urls(store.read_index_manifest(index))
t = time.monotonic()
s, i = exact_search(fine_matrix(qt)[pick], files, 10)
np.savez(work + "/exact.npz", rows=pick, ids=i, scores=s)
json.dump({"queries": int(len(pick)), "seconds": round(time.monotonic() - t, 1)}, open(work + "/exact_info.json", "w"))
"""


COARSE_CHILD = r"""
import json, sys, time
import retrieval.index
import faiss
import numpy as np
from retrieval import fsio
from retrieval.extract.job import read_features
from retrieval.index import store
from retrieval.schema import coarse_matrix
work, queries, index, nprobe = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
S = (100, 500, 1000, 2000, 5000)
rows = np.load(work + "/exact.npz")["rows"]
xq = np.ascontiguousarray(coarse_matrix(read_features(queries, ["coarse"]))[rows])
m = store.read_index_manifest(index)
t = time.monotonic()
heap = faiss.ResultHeap(len(xq), max(S), keep_max=True)
base = 0
for f in sorted(m["feature_files"], key=lambda f: f["file_no"]):
    pf = fsio.parquet_file(f["url"])
    for batch in pf.iter_batches(batch_size=262144, columns=["coarse"]):
        xb = np.ascontiguousarray(coarse_matrix(batch))
        d, i = faiss.knn(xq, xb, min(max(S), len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, np.where(i >= 0, i + base, -1))
        base += len(xb)
heap.finalize()
exact_s = time.monotonic() - t
t = time.monotonic()
_, ivf = store.search_shards(index, xq, max(S), nprobe=nprobe, manifest=m)
starts = np.cumsum([0] + [f["rows"] for f in sorted(m["feature_files"], key=lambda f: f["file_no"])])
fno, r = ivf >> 32, ivf & 0xFFFFFFFF
ivf_rows = np.where(ivf >= 0, starts[np.clip(fno, 0, len(starts) - 2)] + r, -1)
np.savez(work + "/coarse.npz", rows=rows, exact=heap.I, ivf=ivf_rows)
json.dump({"queries": int(len(rows)), "exact_s": round(exact_s, 1), "ivf_s": round(time.monotonic() - t, 1),
           "nprobe": nprobe, "S": S}, open(work + "/coarse_info.json", "w"))
"""


RATES_CHILD = r"""
import json, sys, time
import retrieval.index
import faiss
import numpy as np
from retrieval.extract.job import read_features
from retrieval.index import store
from retrieval.schema import coarse_matrix
work, queries, index = sys.argv[1], sys.argv[2], sys.argv[3]
threads = faiss.omp_get_max_threads()
xq = np.ascontiguousarray(coarse_matrix(read_features(queries, ["coarse"]))[:2000])
m = store.read_index_manifest(index)
shard = store.load_shard(index, 0, m)
ivf = faiss.extract_index_ivf(shard)
sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
def best(f, reps=3):
    out = []
    for _ in range(reps):
        t = time.perf_counter(); f(); out.append(time.perf_counter() - t)
    return min(out)
# flat quantizer assignment: (query x centroid x dim) multiply-adds per second
t_assign = best(lambda: ivf.quantizer.search(xq, 128))
# PQ code scanning: the same search at two nprobe values, the difference is the extra codes
res = {}
for p in (1, 128):
    ivf.nprobe = p
    _, lists = ivf.quantizer.search(xq, p)
    res[p] = (best(lambda: shard.search(xq, 500)), int(sizes[lists].sum()))
codes_s = (res[128][1] - res[1][1]) / (res[128][0] - res[1][0])
# the quantizer a billion-vector index gets (IVF131072_HNSW32): HNSW32 over 131,072 centroids
cent = np.random.default_rng(0).standard_normal((131072, xq.shape[1])).astype(np.float32)
cent /= np.linalg.norm(cent, axis=1, keepdims=True)
hnsw = faiss.IndexHNSWFlat(xq.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
t = time.perf_counter(); hnsw.add(cent); build_s = time.perf_counter() - t
hnsw.hnsw.efSearch = 16          # faiss's default: what add (k = 1) uses
t_hnsw1 = best(lambda: hnsw.search(xq, 1))
hnsw.hnsw.efSearch = 256         # a search at nprobe 256 explores max(efSearch, k) = 256
t_hnsw = best(lambda: hnsw.search(xq, 256))
json.dump({"threads": threads, "queries": len(xq),
           "flat_assign_macs_per_core_s": len(xq) * ivf.nlist * ivf.d / t_assign / threads,
           "pq_codes_per_core_s": codes_s / threads,
           "search_s_nprobe1": res[1][0], "search_s_nprobe128": res[128][0],
           "codes_nprobe1": res[1][1], "codes_nprobe128": res[128][1],
           "hnsw32_131072_build_s": build_s,
           "hnsw32_131072_assign_1_queries_per_core_s": len(xq) / t_hnsw1 / threads,
           "hnsw32_131072_assign_256_queries_per_core_s": len(xq) / t_hnsw / threads},
          open(work + "/rates.json", "w"), indent=1)
"""


def source_hits(work: Path, source: np.ndarray) -> dict:
    """On the exact sample's matching queries: share whose true source is in the top S of the
    EXACT 128-d coarse ranking (the best any coarse index can do) and of the IVF-PQ index."""
    c, info = np.load(work / "coarse.npz"), json.loads((work / "coarse_info.json").read_text())
    src = source[c["rows"]]
    sel = src >= 0
    out = {"queries": int(sel.sum()), "nprobe": info["nprobe"]}
    for s in info["S"]:
        out[f"exact_coarse_top{s}"] = round(float((c["exact"][sel, :s] == src[sel, None]).any(1).mean()), 4)
        out[f"ivfpq_top{s}"] = round(float((c["ivf"][sel, :s] == src[sel, None]).any(1).mean()), 4)
    return out


def gallery_rows_of(ids: np.ndarray, feature_files: list[dict]) -> np.ndarray:
    """Index int64 ids -> gallery row numbers (the feature files are contiguous slices in order)."""
    from retrieval.index import idmap

    files, rows = idmap.decode_ids(ids)
    starts = np.cumsum([0] + [f["rows"] for f in feature_files])
    return np.where(ids >= 0, starts[np.clip(files, 0, len(starts) - 2)] + rows, -1)


def search_figures(work: Path, name: str, source: np.ndarray, feature_files: list[dict]) -> dict:
    """Timings and quality of the search output ``<work>/<name>``: rank-1 true source over all
    matching queries; on the exact sample, recall@10 against the exact 512-d top-10."""
    from retrieval.search import read_results

    sm = json.loads((work / name / "_manifest.json").read_text())
    res = read_results(str(work / name)).select(["query_id", "rank", "gallery_id"]).to_pydict()
    q_index = {f"q{i:010d}": i for i in range(len(source))}
    ranked: dict[int, list] = {}
    for q, r, g in zip(res["query_id"], res["rank"], res["gallery_id"]):
        ranked.setdefault(q_index[q], []).append((r, int(g[3:])))       # gallery id "img%010d" -> row
    top10 = {q: [g for _, g in sorted(v)] for q, v in ranked.items()}
    matching = np.flatnonzero(source >= 0)
    ex = np.load(work / "exact.npz")
    exact_rows = gallery_rows_of(ex["ids"], feature_files)
    kept = [len(set(top10.get(int(q), [])) & set(e[e >= 0].tolist())) / max(1, int((e >= 0).sum()))
            for q, e in zip(ex["rows"], exact_rows)]
    sample_match = [(int(q), e) for q, e in zip(ex["rows"], exact_rows) if source[q] >= 0]
    return {
        "params": sm["params"], "timings": sm["timings"], "counts": sm["counts"],
        "pairs_reranked": int(sm["counts"]["queries_with_shortlist"] * sm["params"]["shortlist"]),
        "gallery_row_groups_read": sum(c.get("gallery_row_groups_read", 0) for c in sm["chunks"]),
        "rank1_true_source": round(float(np.mean([top10.get(int(q), [-1])[0] == source[q] for q in matching])), 4),
        "exact_sample": int(len(ex["rows"])),
        "recall@10_vs_exact": round(float(np.mean(kept)), 4),
        "rank1_true_source_on_sample": round(float(np.mean(
            [top10.get(q, [-1])[0] == source[q] for q, _ in sample_match])), 4),
        "rank1_true_source_exact_on_sample": round(float(np.mean(
            [e[0] == source[q] for q, e in sample_match])), 4),
    }


COPY_CHILD = r"""
import json, os, shutil, sys, time
import retrieval.index
import faiss
from retrieval.index import finecopy, store
work, index, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = store.read_index_manifest(index)
urls = store.feature_file_urls(m)
out, runs = os.path.join(work, "copytime"), []
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
for shard in range(min(n, len(m["shards"]))):
    loaded = store.load_shard(index, shard, m)          # kept referenced: ivf points into it
    ivf = faiss.extract_index_ivf(loaded)
    segments = [(f, urls[f], a, b) for f, a, b in m["shards"][shard]["segments"]]
    t = time.monotonic()
    entry = finecopy.write_copy(out, shard, ivf, segments)
    runs.append({"shard": shard, "seconds": round(time.monotonic() - t, 2), "bytes": entry["bytes"],
                 "rows": entry["rows"], "same_sha256": entry["sha256"] == m["shards"][shard]["fine_by_list"]["sha256"]})
shutil.rmtree(out)
json.dump(runs, open(os.path.join(work, "copytime.json"), "w"), indent=1)
"""

# the search CLI in a child, with the per-process cache of query vectors cut to one chunk: each
# gallery-major block task reads the query chunks it needs, as on its own executor (as in
# bench_fine_by_list.py); in one local process the blocks would otherwise share them
LOCALITY_CLI = ("import sys; from retrieval.search import blocks; blocks.QUERY_CACHE_BYTES = 1; "
                "from retrieval.cli import entry; entry(sys.argv[1:])")
LOCALITY_MODES = {"chunk": ["search.rerank=chunk"],
                  "files": ["search.rerank=gallery", "search.fine_layout=files"],
                  "lists": ["search.rerank=gallery", "search.fine_layout=lists"]}


def locality_run(work: Path, qurl: str, sets: list[str], name: str, mode_sets: list[str]) -> dict:
    """One measured search of the locality comparison (resumable: kept in ``<work>/<name>.json``)."""
    if not (work / name / "_manifest.json").exists():
        (work / f"{name}.json").unlink(missing_ok=True)
    run = measured(name, work, [PY, "-c", LOCALITY_CLI,
                                "search", "--queries", qurl, "--index", str(work / "index"), "--output", str(work / name),
                                "--engine", "local", *sets, *[x for s in mode_sets for x in ("--set", s)]])
    m = json.loads((work / name / "_manifest.json").read_text())
    io = m["io"]
    return {"name": name, "run": run, "io": io, "timings": m["timings"], "chunks": m["counts"]["chunks"],
            "blocks": m["params"]["blocks"], "nprobe": m["params"]["nprobe"],
            "query_side_bytes": (io.get("query_fine_bytes_read") or 0) + (io.get("query_fine_bytes_shuffled") or 0)}


def copy_cost(work: Path, copy_shards: int) -> dict:
    """What the list-ordered fine copy adds to the index: its bytes (manifest) and the time to write
    it, measured by rewriting ``copy_shards`` shards' copies serially (same sha256 checked)."""
    im = json.loads((work / "index" / "_manifest.json").read_text())
    copies = [s["fine_by_list"] for s in im["shards"] if s.get("fine_by_list")]
    if not (work / "copytime.json").exists():
        (work / "copy-time.json").unlink(missing_ok=True)
    run = measured("copy-time", work, [PY, "-c", COPY_CHILD, str(work), str(work / "index"), str(copy_shards)])
    per = json.loads((work / "copytime.json").read_text())
    per_shard_s = sum(r["seconds"] for r in per) / max(1, len(per))
    index_bytes = du(work / "index")
    copy_bytes = sum(c["bytes"] for c in copies)
    return {"shards": len(im["shards"]), "shards_with_copy": len(copies), "copy_bytes": copy_bytes,
            "copy_rows": sum(c["rows"] for c in copies), "feature_files_bytes": du(work / "gallery"),
            "index_bytes_on_disk": index_bytes, "index_bytes_without_copy": index_bytes - copy_bytes,
            "rewrite_measured": per, "rewrite_run": run, "seconds_per_shard": round(per_shard_s, 2),
            "seconds_all_shards_serial": round(per_shard_s * len(im["shards"]), 1),
            "index_timings": im["timings"]}


def locality(work: Path, qurl: str, sets: list[str], spec: str, rounds: int, copy_shards: int) -> dict:
    """The rerank's read pattern: the same search (a vector cache far below the fine column,
    several query chunks) chunk-major once, then gallery-major over feature-file blocks
    (``search.fine_layout=files``) and over the list-ordered copy (``lists``), alternated ``rounds``
    times; bytes read (search manifest ``io``), wall time, peak memory, rows equal to chunk-major's."""
    from retrieval.search import read_results

    cache_mb, chunk = (int(x) for x in spec.split(","))
    common = [*sets, "--set", f"search.vector_cache_mb={cache_mb}", "--set", f"search.query_chunk={chunk}"]
    out: dict = {"vector_cache_mb": cache_mb, "query_chunk": chunk, "rounds": rounds, "query_cache": "one chunk",
                 "runs": {m: [] for m in LOCALITY_MODES}}
    out["runs"]["chunk"].append(locality_run(work, qurl, common, f"loc_chunk_c{cache_mb}_q{chunk}",
                                             LOCALITY_MODES["chunk"]))
    for r in range(rounds):
        for mode in (("files", "lists") if r % 2 == 0 else ("lists", "files")):
            out["runs"][mode].append(locality_run(work, qurl, common, f"loc_{mode}_c{cache_mb}_q{chunk}_r{r}",
                                                  LOCALITY_MODES[mode]))
    ref = read_results(str(work / out["runs"]["chunk"][0]["name"]))
    out["rows"] = ref.num_rows
    out["rows_identical"] = {r["name"]: bool(ref.equals(read_results(str(work / r["name"]))))
                             for m in ("files", "lists") for r in out["runs"][m]}
    summary = {}
    for mode, runs in out["runs"].items():
        walls = sorted(r["run"]["wall_s"] for r in runs)
        io = runs[0]["io"]
        summary[mode] = {"wall_s": walls, "median_wall_s": statistics.median(walls), "blocks": runs[0]["blocks"],
                         "layout": io["gallery_fine_layout"], "query_fine_bytes_read": io["query_fine_bytes_read"],
                         "query_fine_bytes_shuffled": io["query_fine_bytes_shuffled"],
                         "query_side_bytes": runs[0]["query_side_bytes"],
                         "gallery_fine_bytes_read": io["gallery_fine_bytes_read"],
                         "gallery_fine_column_bytes": io["gallery_fine_column_bytes"],
                         "gallery_fine_reads_per_column": io["gallery_fine_reads_per_column"],
                         "peak_rss_mb_max": max(r["run"]["peak_rss_mb"] for r in runs),
                         "loads": [[r["run"]["load_before"], r["run"]["load_avg"], r["run"]["load_after"]] for r in runs]}
    out["summary"] = summary
    files = out["runs"]["files"][0]
    out["auto_picks"] = "lists" if files["blocks"] > files["nprobe"] else "files"
    out["auto_rule"] = f"{files['blocks']} feature-file blocks > nprobe {files['nprobe']}"
    out["query_side_files_over_lists"] = round(summary["files"]["query_side_bytes"]
                                               / max(1, summary["lists"]["query_side_bytes"]), 2)
    out["median_wall_files_over_lists"] = round(summary["files"]["median_wall_s"] / summary["lists"]["median_wall_s"], 2)
    out["index_copy"] = copy_cost(work, copy_shards)
    (work / f"locality_c{cache_mb}_q{chunk}.json").write_text(json.dumps(out, indent=2))
    if not all(out["rows_identical"].values()):
        raise SystemExit(f"rows differ from the chunk-major rerank's: {out['rows_identical']}")
    return out


def figures(work: Path, args, source: np.ndarray, runs: dict, searches: list[str]) -> dict:
    import pyarrow as pa

    im = json.loads((work / "index" / "_manifest.json").read_text())
    n = args.n
    feat_bytes = du(work / "gallery")
    return {
        "gallery": n, "queries": len(source), "matching_queries": int((source >= 0).sum()),
        "machine": {"cores": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                              * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "stages": runs,
        "features": {"bytes_on_disk": feat_bytes, "bytes_per_vector": round(feat_bytes / n, 1),
                     "files": len(im["feature_files"])},
        "index": {"index_key": im["index_key"], "nlist": im["nlist"], "nprobe": im["nprobe"],
                  "shards": len(im["shards"]), "train_sample_size": im["train_sample_size"],
                  "bytes_on_disk": du(work / "index"), "bytes_per_vector": im["bytes_per_vector"],
                  "timings": im["timings"],
                  "build_quality": {k: v for k, v in im["quality"].items() if k != "by_nprobe"},
                  "add_vectors_per_s": round(n / im["timings"]["shards_s"], 1)},
        "search": {name: search_figures(work, name, source, im["feature_files"]) for name in searches},
        "source_in_shortlist": source_hits(work, source),
        "exact": json.loads((work / "exact_info.json").read_text()),
        "pyarrow": pa.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--parts", type=int, default=20, help="gallery feature outputs (N / parts rows each)")
    ap.add_argument("--match", type=int, default=5_000)
    ap.add_argument("--nomatch", type=int, default=5_000)
    ap.add_argument("--exact-sample", type=int, default=1_000)
    ap.add_argument("--extra-shortlist", type=int, default=500, help="also search at this shortlist (0: no)")
    ap.add_argument("--workdir", default="/tmp/bench_scale")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="extra --set for both stages")
    ap.add_argument("--locality", default="", metavar="CACHE_MB,CHUNK",
                    help="also search with search.vector_cache_mb=CACHE_MB and search.query_chunk=CHUNK, "
                         "chunk-major then gallery-major rerank: gallery fine bytes read, wall time, rows "
                         "identical (issue 13: e.g. 256,1250); the gallery-major one over feature-file blocks "
                         "and over the list-ordered fine copy (search.fine_layout files / lists)")
    ap.add_argument("--locality-rounds", type=int, default=2,
                    help="--locality: gallery-major files / lists runs, alternated (the chunk-major one runs once)")
    ap.add_argument("--copy-shards", type=int, default=2,
                    help="--locality: shards whose list-ordered fine copy is rewritten to time it")
    ap.add_argument("--locality-only", action="store_true", help="stop after the --locality searches")
    ap.add_argument("--build-only", action="store_true", help="stop after the index build")
    args = ap.parse_args(argv)
    work = Path(args.workdir) / f"n{args.n}_q{args.match}_{args.nomatch}"
    work.mkdir(parents=True, exist_ok=True)
    log(f"bench_scale: {args.n:,} gallery vectors, {args.match + args.nomatch:,} queries in {work}; "
        f"load {load()}")
    runs: dict = {}
    gen = work / "generate.json"
    if not gen.exists():
        t = time.monotonic()
        parts, info = write_gallery(work, args.n, args.parts)
        info["gallery_s"] = round(time.monotonic() - t, 1)
        qurl, source = write_queries(work, args.n, args.match, args.nomatch)
        info["total_s"] = round(time.monotonic() - t, 1)
        gen.write_text(json.dumps(info))
    runs["generate"] = json.loads(gen.read_text())
    parts, _ = write_gallery(work, args.n, args.parts)          # all present now: just the URLs
    qurl, source = write_queries(work, args.n, args.match, args.nomatch)
    sets = [x for s in args.sets for x in ("--set", s)]
    cli = [PY, "-c", "import sys; from retrieval.cli import entry; entry(sys.argv[1:])"]
    if not (work / "index" / "_manifest.json").exists():
        (work / "index.json").unlink(missing_ok=True)
    runs["index"] = measured("index", work, cli + [
        "index", *[x for p in parts for x in ("--features", p)], "--output", str(work / "index"),
        "--engine", "local", *sets])
    if args.build_only:
        return 0
    if args.locality:
        loc = locality(work, qurl, sets, args.locality, args.locality_rounds, args.copy_shards)
        print(json.dumps(loc, indent=2), flush=True)
        if args.locality_only:
            return 0
    if not (work / "search" / "_manifest.json").exists():
        (work / "search.json").unlink(missing_ok=True)
    runs["search"] = measured("search", work, cli + [
        "search", "--queries", qurl, "--index", str(work / "index"), "--output", str(work / "search"),
        "--engine", "local", *sets])
    searches = ["search"]
    if args.extra_shortlist:
        name = f"search_s{args.extra_shortlist}"
        searches.append(name)
        if not (work / name / "_manifest.json").exists():
            (work / f"{name}.json").unlink(missing_ok=True)
        runs[name] = measured(name, work, cli + [
            "search", "--queries", qurl, "--index", str(work / "index"), "--output", str(work / name),
            "--engine", "local", *sets, "--set", f"search.shortlist={args.extra_shortlist}"])
    if not (work / "exact.npz").exists():
        (work / "exact.json").unlink(missing_ok=True)
    runs["exact"] = measured("exact", work, [PY, "-c", EXACT_CHILD, str(work), qurl, str(work / "index"),
                                             str(args.exact_sample)])
    if not (work / "coarse.npz").exists():
        (work / "coarse.json").unlink(missing_ok=True)
    nprobe = json.loads((work / "search" / "_manifest.json").read_text())["params"]["nprobe"]
    runs["coarse-diagnosis"] = measured("coarse", work, [PY, "-c", COARSE_CHILD, str(work), qurl,
                                                         str(work / "index"), str(nprobe)])
    if not (work / "rates.json").exists():
        (work / "coarse-rates.json").unlink(missing_ok=True)
    runs["coarse-rates"] = measured("coarse-rates", work, [PY, "-c", RATES_CHILD, str(work), qurl, str(work / "index")])
    result = figures(work, args, source, runs, searches)
    result["coarse_rates"] = json.loads((work / "rates.json").read_text())
    (work / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
