"""``retrieval plan``: a capacity plan for N images from rates measured by the benchmarks here.

Every rate below is a figure measured on this project's 2-core CPU machine by the named benchmark
(per core), except two ASSUMPTIONS, marked as such: the GPU extraction rate (no GPU was lent) and
the read bandwidth of an executor from object storage. The model is deliberately simple and says
what each stage's cost grows with (docs/billion.md):

- extract: images / (rate per core x cores) (or per GPU): linear in N, embarrassingly parallel;
  storage = bytes per image measured on disk (int8 fine + float32 coarse).
- index: one read of the features (sha256 + coarse codes); k-means on a bounded sample on the
  driver (grows with nlist, not N); adding N vectors (linear in N, parallel over shards: the
  quantizer assignment dominates); N x bytes/vector written.
- search, coarse: every (query, group of ``search.shard_cache`` index shards) assigns the query to
  its nprobe cells once (flat quantizer: nlist x d multiply-adds; HNSW above 16,384 cells) and
  scans queries x nprobe x N / nlist codes (4-bit fast-scan or 8-bit PQ, as the index rule picks).
- search, merge: each shard's top-K' lists (K' = the binomial bound of ``search.shard_shortlist``)
  are shuffled to one task per query chunk: queries x K' x 12 bytes x index shards (nothing when
  every shard fits one task's shard cache).
- search, rerank: queries x shortlist 512-d pairs, plus, per query chunk, the gallery row groups its
  shortlists touch (Poisson: 1 - exp(-chunk x S x R / N) of the fine column; at a billion with
  8,192-query chunks that is all of it, once per chunk), read and decoded.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from retrieval.index import finecopy
from retrieval.plan_rates import RATES, by_list, query_rows_per_image
from retrieval.stage import Stage, arg


@dataclass
class Cluster:
    executors: int = 100
    executor_memory_gb: float = 16.0
    executor_cores: int = 4
    gpus: int = 0                 # GPUs in total (extraction only)

    @property
    def cores(self) -> int:
        return self.executors * self.executor_cores


def parse_memory(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", str(text).lower())
    if not m:
        raise ValueError(f"executor memory {text!r}: expected e.g. 16g, 512m")
    return float(m.group(1)) * {"": 1e-9, "k": 1e-6, "m": 1e-3, "g": 1.0, "t": 1e3}[m.group(2)]


def index_params(n: int, cfg=None, vectors_per_shard: int | None = None) -> dict:
    """The parameters ``retrieval index`` would choose for ``n`` vectors under ``cfg`` (and
    ``vectors_per_shard``, default ``index.vectors_per_shard``):
    :func:`retrieval.index.params.choose_params`: nlist ~ 4 sqrt(N), codes from the memory budget
    (fast-scan where shards fill its blocks), the training sample; and the search's nprobe."""
    from retrieval import config
    from retrieval.index.params import FLAT_QUANTIZER_MAX, choose_params, is_fast_scan

    cfg = cfg if cfg is not None else config.load()
    if vectors_per_shard:
        cfg = cfg.with_overrides({"index.vectors_per_shard": int(vectors_per_shard)})
    p = choose_params(max(int(n), 1), int(cfg["model.coarse_dim"]), cfg)
    # search.nprobe, else (auto: the index's tuned value) index.nprobe, else (auto: tuned at build) 16
    nprobe = int(next((v for v in (cfg["search.nprobe"], cfg["index.nprobe"]) if v != "auto"), 16))
    return {"index_key": p.index_key, "nlist": p.nlist, "pq_bytes": p.pq_bytes, "nprobe": min(nprobe, p.nlist),
            "train_points": p.train_size, "kmeans": p.kmeans, "kmeans_iters": p.kmeans_iters,
            "quantizer": "flat" if p.nlist <= FLAT_QUANTIZER_MAX else "hnsw",
            "fast_scan": is_fast_scan(p.index_key),
            "bytes_per_vector": p.bytes_per_vector_est}


def _centroid_work(ip: dict) -> float:
    """Centroid evaluations per training point per k-means iteration (two-level: sqrt(nlist)
    coarse clusters, then sqrt(nlist) cells inside each)."""
    return ip["nlist"] if ip["kmeans"] == "flat" else 2 * math.sqrt(ip["nlist"])


def _assign_s(ip: dict, dim: int, search: bool) -> float:
    """Core-seconds to assign one vector (add) or one query (search, nprobe cells) to cells."""
    r = RATES
    if ip["quantizer"] == "flat":
        return ip["nlist"] * dim / r["flat_assign_macs_per_core_s"]
    if not search or ip["nprobe"] <= 16:
        return 1.0 / r["hnsw_assign_add_per_core_s"]
    return ip["nprobe"] / 256 / r["hnsw_assign_search256_per_core_s"]   # HNSW work ~ max(efSearch, k)


FINE_ROW_BYTES = 516.0      # a fine vector as stored and decoded: 512 int8 codes + a float32 scale
LABEL_ROW_BYTES = 140.0     # image_id + uri of a gallery row as stored: at most feature_bytes_per_image
                            # (1,177, real images) less the vector columns (516 + 512)


def rerank_reads(n: int, queries: int, shortlist: int, chunks: int, query_chunk: int, row_group_size: int,
                 cfg, nprobe: int = 0, index_shards: int = 0) -> dict:
    """What the search's rerank reads and shuffles, in the mode ``search.rerank`` resolves to
    (retrieval/search/blocks.py). Chunk-major: per chunk, the share of the column its C x S
    candidates touch (Poisson: 1 - exp(-C x S x R / N)). Gallery-major: blocks of
    ``search.vector_cache_mb``; the touched column once; every block reads the query vectors of
    the queries with a candidate in it (1 - exp(-S x block rows / N) of them); pairs go to the
    blocks (16 B each) and each query's k best per block come back (20 B each). The result rows'
    labels (image_id, uri): chunk-major, per chunk the label row groups its k results per query touch;
    gallery-major, once (the ids go to their blocks and the labels back). Memory of a block task: its
    block, its pairs and kept pairs, one chunk's query vectors and score buffer."""
    k = int(cfg["search.k"])
    column = n * FINE_ROW_BYTES
    cache = int(cfg["search.vector_cache_mb"]) * 2**20
    mode = str(cfg["search.rerank"])
    if mode == "auto":
        mode = "gallery" if chunks > 1 and column > cache else "chunk"
    pairs = float(queries) * shortlist
    out = {"mode": mode, "column_bytes": column, "cache_bytes": cache, "blocks": 0, "query_touched": 0.0,
           "touched": 1.0 - math.exp(-min(queries, query_chunk) * shortlist * row_group_size / max(n, 1))}
    labels = n * LABEL_ROW_BYTES
    results = float(queries) * k
    if mode == "chunk":      # each chunk's k results per query touch this share of the label row groups
        touched_k = 1.0 - math.exp(-min(queries, query_chunk) * k * row_group_size / max(n, 1))
        out.update(gallery_bytes=chunks * column * out["touched"], query_bytes=queries * FINE_ROW_BYTES,
                   label_bytes=chunks * labels * touched_k, shuffle_bytes=0.0, block_task_bytes=0.0)
        return out
    blocks = max(1, math.ceil(column / max(cache, row_group_size * FINE_ROW_BYTES)))
    block_rows = n / blocks
    lam = shortlist * block_rows / max(n, 1)            # a query's candidates in one block (Poisson)
    kept_per_block = sum(min(j, k) * math.exp(-lam + j * math.log(lam) - math.lgamma(j + 1))
                         for j in range(0, int(lam + 10 * math.sqrt(lam) + k + 10))) if lam > 0 else 0.0
    kept = min(pairs, queries * blocks * kept_per_block)
    touched_run = 1.0 - math.exp(-pairs * row_group_size / max(n, 1))     # row groups with a candidate
    rows = queries * query_rows_per_image(cfg)
    out.update(blocks=blocks, query_touched=1.0 - math.exp(-lam), query_rows=rows,
               gallery_bytes=column * min(1.0, touched_run),
               query_bytes=blocks * rows * FINE_ROW_BYTES * (1.0 - math.exp(-lam)),
               label_bytes=labels * (1.0 - math.exp(-results * row_group_size / max(n, 1))),
               shuffle_bytes=pairs * 16 + kept * 20 + results * (16 + LABEL_ROW_BYTES), pairs_kept=kept,
               block_task_bytes=min(cache, column) + pairs / blocks * 16 + kept / blocks * 20
               + query_chunk * (shortlist * 4 + 512 * 4))
    if by_list(cfg) and nprobe and index_shards and (blocks > nprobe or cfg["search.fine_layout"] == "lists"):
        # blocks = ranges of IVF lists of the list-ordered copy (auto: when more blocks than nprobe, as the
        # search does): a query row's candidates lie in its
        # nprobe lists, so its vector goes to at most that many blocks (random lists: the expected
        # distinct blocks; sibling cells are numbered together, so fewer), read once by its merge
        # task; each block reads its lists' row groups of every shard's copy (an edge group twice)
        per_row = blocks * (1.0 - (1.0 - 1.0 / blocks) ** nprobe)
        edge = min(1.0, blocks * index_shards * 2 * finecopy.ROW_GROUP * FINE_ROW_BYTES / column)
        out.update(layout="lists", query_blocks=per_row, query_bytes=rows * FINE_ROW_BYTES * (1 + per_row),
                   gallery_bytes=column * (1.0 + edge))
    return out


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if b < 1000 or unit == "PB":
            return f"{b:,.1f} {unit}"
        b /= 1000
    return f"{b:.1f} PB"


def _fmt_time(s: float) -> str:
    if s < 120:
        return f"{s:,.0f} s"
    if s < 7200:
        return f"{s / 60:,.1f} min"
    return f"{s / 3600:,.1f} h"


def _extract_estimate(n: int, cluster: Cluster, cfg, images_per_feature_shard: int) -> tuple[int, float, str, float]:
    """Extraction: linear in N, embarrassingly parallel: ``(tasks, wall, basis, storage)``."""
    r = RATES
    feature_shards = max(1, math.ceil(n / images_per_feature_shard))
    cores = cluster.cores
    if cluster.gpus:
        extract_s = n / (r["extract_images_per_gpu_s"] * cluster.gpus)
        basis = f"{cluster.gpus} GPUs x {r['extract_images_per_gpu_s']:.0f} img/s (ASSUMED, not measured here)"
    else:
        runtime = str(cfg["model.runtime"])
        onnx = runtime != "torch"           # auto (the default) and onnx run the trunk on onnxruntime on CPUs
        rate = r["extract_images_per_core_s_onnx"] if onnx else r["extract_images_per_core_s"]
        extract_s = n / (rate * cores)
        basis = f"{cores} cores x {rate} img/s/core (measured here, model.runtime={runtime})"
        if onnx:
            large = r["extract_images_per_core_s_large"]
            basis += f"; JPEG photos of 1-12 MP: {_fmt_time(n / (large * cores))} ({large} img/s/core)"
        if not onnx:
            basis += (f"; model.runtime=auto: {_fmt_time(n / (r['extract_images_per_core_s_onnx'] * cores))}"
                      f" ({r['extract_images_per_core_s_onnx']} img/s/core)")
    return feature_shards, extract_s, basis, n * r["feature_bytes_per_image"]


def _rerank_basis(rr: dict, queries: int, pairs: float, compute_s: float, read_s: float, shuffle_s: float,
                  chunks: int) -> str:
    if rr["mode"] == "gallery":
        return (f"rerank gallery-major over {rr['blocks']:,} blocks: {pairs:.3g} pairs "
                f"{_fmt_time(compute_s)} + gallery fine reads {_fmt_bytes(rr['gallery_bytes'])} "
                f"({rr['gallery_bytes'] / rr['column_bytes']:.2f}x the column) + query reads "
                f"{_fmt_bytes(rr['query_bytes'])} ({_query_basis(rr)}) + label reads {_fmt_bytes(rr['label_bytes'])} "
                f"{_fmt_time(read_s)} + shuffle {_fmt_bytes(rr['shuffle_bytes'])} {_fmt_time(shuffle_s)}")
    return (f"rerank chunk-major: {pairs:.3g} pairs {_fmt_time(compute_s)} + gallery "
            f"fine reads {_fmt_bytes(rr['gallery_bytes'])} ({rr['touched']:.0%} of the column x "
            f"{chunks:,} chunks) + label reads {_fmt_bytes(rr['label_bytes'])} {_fmt_time(read_s)}")


def _fine_copy(n: int, shards: int, cfg, read_bw: float) -> tuple[float, float, str, float]:
    """The index's list-ordered fine copy (index.fine_by_list): bytes, seconds, basis, memory per
    task. Each shard task writes it in passes of <= finecopy.PASS_BYTES, each reading its slice's
    fine column again."""
    if not cfg["index.fine_by_list"]:
        return 0.0, 0.0, "", 0.0
    copy_bytes, shard_bytes = n * FINE_ROW_BYTES, n * FINE_ROW_BYTES / max(1, shards)
    n_passes = max(1, math.ceil(shard_bytes / finecopy.PASS_BYTES))
    copy_s = (n_passes + 1) * copy_bytes / read_bw
    return copy_bytes, copy_s, (f"; list-ordered fine copy {_fmt_bytes(copy_bytes)}: {n_passes} reads + a write "
                                f"{_fmt_time(copy_s)}"), 2.0 * min(shard_bytes, finecopy.PASS_BYTES)


def _query_basis(rr: dict) -> str:
    rows = _fmt_bytes(rr["query_rows"] * FINE_ROW_BYTES)
    if rr.get("layout") == "lists":
        return f"list-ordered copy: {rows} of query rows read once + sent to {rr['query_blocks']:.1f} blocks each"
    return (f"feature-file blocks, no list-ordered copy: {rr['blocks']:,} blocks x {rr['query_touched']:.0%} "
            f"of {rows} of query rows")


def _search_warnings(rr: dict, chunks: int, read_s: float, compute_s: float) -> list[str]:
    out = []
    if rr["mode"] == "chunk" and chunks > 1 and rr["touched"] > 0.5 and read_s > compute_s:
        out.append(f"search: each of the {chunks:,} query chunks reads {rr['touched']:.0%} of the gallery's "
                   f"fine column; search.rerank=gallery reads it once (or larger chunks, "
                   f"search.query_chunk, cut the reads proportionally)")
    if rr["mode"] == "gallery" and rr["query_bytes"] > rr["gallery_bytes"]:
        out.append(f"search: the {rr['blocks']:,} gallery blocks each read the query vectors "
                   f"({_fmt_bytes(rr['query_bytes'])} in all); index.fine_by_list: true (the default) sends "
                   f"each only to the blocks its shortlist touches; a larger search.vector_cache_mb (the block "
                   f"size, memory per block task) means fewer blocks")
    return out


def _takedowns(n: int, files: int, feature_bytes: float, read_bw: float, cores: int, add_s: float,
               search_s: float) -> dict:
    """remove: one scan of the image ids; search with 1% of N tombstoned; compaction, worst case (every file)."""
    remove_s, compact_s, dead = n / (RATES["remove_ids_scanned_per_core_s"] * cores), \
        2 * feature_bytes / read_bw + add_s, n / 100
    return {"tasks": files, "wall": remove_s, "storage": dead * 40.0, "memory_per_task": 0.3e9, "basis": (
        f"scan {n:.3g} ids {_fmt_time(remove_s)}; search with {dead:.3g} tombstones (1%, {_fmt_bytes(dead * 8)} "
        f"per task): +{_fmt_time(search_s * (RATES['search_tombstone_ratio'] - 1))}; compaction "
        f"<= {_fmt_time(compact_s)}")}


def _pdq_line(n: int, cores: int, cfg) -> dict:
    from retrieval.index.pdq import plan_line     # its rates: retrieval/index/pdq.py PLAN_RATES
    return plan_line(n, cores, int(cfg["pdq.chunk_rows"]), int(cfg["pdq.shard_rows"]))


def plan(images: int, cluster: Cluster, queries: int = 10_000_000, shortlist: int | str = "auto",
         vectors_per_index_shard: int = 10_000_000, images_per_feature_shard: int = 250_000,
         query_chunk: int = 8192, row_group_size: int = 1024, cfg=None) -> dict:
    """The plan of every stage (:func:`_plan`), and ``duplicates``: a search with every image a query, in slices."""
    from retrieval.duplicates.cost import duplicates_stage

    args = (shortlist, vectors_per_index_shard, images_per_feature_shard, query_chunk, row_group_size, cfg)
    p = _plan(images, cluster, queries, *args)
    p["stages"]["duplicates"] = dup = duplicates_stage(
        p, lambda q: _plan(images, cluster, int(q), *args)["stages"]["search"], cluster,
        RATES["read_bytes_per_executor_s"], _fmt_time, _fmt_bytes, cfg)
    p["warnings"] += dup.pop("warnings")
    return p


def _plan(images: int, cluster: Cluster, queries: int = 10_000_000, shortlist: int | str = "auto",
          vectors_per_index_shard: int = 10_000_000, images_per_feature_shard: int = 250_000,
          query_chunk: int = 8192, row_group_size: int = 1024, cfg=None) -> dict:
    from retrieval import config
    from retrieval.search.coarse import auto_shortlist, shard_shortlist

    r = RATES
    cfg = cfg if cfg is not None else config.load()
    n = int(images)
    shortlist = auto_shortlist(n) if shortlist in ("auto", 0) else int(shortlist)   # auto: the size rule
    ip, dim, cores = index_params(n, cfg, vectors_per_index_shard), 128, cluster.cores
    read_bw = min(r["read_bytes_per_executor_s"] * cluster.executors, r["fine_decode_bytes_per_core_s"] * cores)
    feature_shards, extract_s, extract_basis, feature_bytes = _extract_estimate(n, cluster, cfg,
                                                                                 images_per_feature_shard)
    # index: one read of the features, k-means on a bounded sample (driver), N adds over the shards
    index_shards = max(1, math.ceil(n / vectors_per_index_shard))
    scan_s = feature_bytes / read_bw
    train_s = ip["train_points"] * _centroid_work(ip) * ip["kmeans_iters"] \
        / (r["index_train_point_centroids_per_core_s"] * max(1, cluster.executor_cores))
    add_core_s = 1.0 / r["index_add_vectors_per_core_s"] + (_assign_s(ip, dim, False) if ip["quantizer"] == "hnsw" else 0.0)
    add_s = n * add_core_s / min(cores, index_shards * cluster.executor_cores)
    # measured for 8-bit PQ16; fast-scan: the rule's estimate (codes + block padding + id + trained
    # part / N: 28.2 B at 1M, measured 28.3)
    bpv = ip["bytes_per_vector"] if ip["fast_scan"] else r["index_bytes_per_vector"]
    index_bytes = n * bpv
    copy_bytes, copy_s, copy_basis, copy_mem = _fine_copy(n, index_shards, cfg, read_bw)
    shard_bytes = min(n, vectors_per_index_shard) * bpv
    # search, coarse: every (query, shard group) assigns the query once, then each shard scans nprobe lists
    shard_cache = int(cfg["search.shard_cache"])
    groups = math.ceil(index_shards / max(1, shard_cache))
    codes_scanned = queries * ip["nprobe"] * n / ip["nlist"]
    assign_s = queries * groups * _assign_s(ip, dim, True) / cores
    scan_rate = r["coarse_fs_codes_per_core_s"] if ip["fast_scan"] else r["coarse_codes_per_core_s"]
    scan_codes_s = codes_scanned / (scan_rate * cores)
    # the per-shard top-K' lists travel to one merge task per chunk (none when one group holds all)
    k_shard = shard_shortlist(shortlist, index_shards, cfg["search.shard_shortlist"])
    shuffle_bytes = queries * k_shard * 12.0 * index_shards if groups > 1 else 0.0
    shuffle_s = shuffle_bytes / (r["read_bytes_per_executor_s"] * cluster.executors)
    coarse_s = assign_s + scan_codes_s + shuffle_s
    # search, rerank: pairs scored + the gallery's fine vectors read (chunk-major: per chunk; gallery-major:
    # each block once, the query vectors to the blocks, the pairs shuffled to the blocks and the kept ones back)
    chunks = max(1, math.ceil(queries / query_chunk))
    rr = rerank_reads(n, queries, shortlist, chunks, query_chunk, row_group_size, cfg, ip["nprobe"], index_shards)
    rerank_pairs = queries * shortlist
    rerank_compute_s = rerank_pairs / (r["rerank_pairs_per_core_s"] * cores)
    rerank_read_s = (rr["gallery_bytes"] + rr["query_bytes"] + rr["label_bytes"]) / read_bw
    rerank_shuffle_s = rr["shuffle_bytes"] / (r["read_bytes_per_executor_s"] * cluster.executors)
    rerank_s = rerank_compute_s + rerank_read_s + rerank_shuffle_s
    coarse_tasks = (groups * chunks + chunks) if groups > 1 else chunks
    shards_mem = min(shard_cache, index_shards) * shard_bytes * 1.2
    rerank_basis = _rerank_basis(rr, queries, rerank_pairs, rerank_compute_s, rerank_read_s, rerank_shuffle_s, chunks)
    if rr["mode"] == "gallery":
        tasks = coarse_tasks + rr["blocks"] + chunks
        memory = max(shards_mem + query_chunk * shortlist * 24, rr["block_task_bytes"])
    else:
        tasks = coarse_tasks
        memory = shards_mem + query_chunk * shortlist * 24 + rr["cache_bytes"]
    mem_gb = cluster.executor_memory_gb / max(1, cluster.executor_cores)
    stages = {
        "extract": {"tasks": feature_shards, "basis": extract_basis, "wall": extract_s,
                    "storage": feature_bytes, "memory_per_task": 0.6e9 + 1024 * 2600},
        "index": {"tasks": index_shards, "wall": scan_s + train_s + add_s + 60 + copy_s, "basis": f"read features "
                  f"{_fmt_time(scan_s)}; k-means ({ip['kmeans']}) on {ip['train_points']:,} pts on the driver "
                  f"{_fmt_time(train_s)}; add {_fmt_time(add_s)} ({1 / add_core_s:,.0f} vec/s/core){copy_basis}",
                  "storage": index_bytes + copy_bytes, "memory_per_task": 1.3 * shard_bytes
                  + ip["nlist"] * 128 * 4 * 2 + copy_mem},
        "search": {"tasks": tasks, "wall": coarse_s + rerank_s,
                   "basis": f"coarse {_fmt_time(coarse_s)} (assign {queries:.3g} queries x {groups} shard groups "
                            f"{_fmt_time(assign_s)}, scan {codes_scanned:.3g} codes {_fmt_time(scan_codes_s)}, "
                            f"shuffle {k_shard} per shard: {_fmt_bytes(shuffle_bytes)} {_fmt_time(shuffle_s)}); "
                            + rerank_basis,
                   "storage": queries * 10 * 120.0, "memory_per_task": memory, "rerank": rr},
        "remove": _takedowns(n, feature_shards, feature_bytes, read_bw, cores, add_s, coarse_s + rerank_s),
        **({"pdq": _pdq_line(n, cores, cfg)} if cfg["extract.pdq"] else {})}     # the PDQ index (extract.pdq)
    warnings = [f"{name}: {_fmt_bytes(s['memory_per_task'])} per task > {mem_gb:.1f} GB per core"
                for name, s in stages.items() if s["memory_per_task"] > mem_gb * 1e9]
    warnings += _search_warnings(rr, chunks, rerank_read_s, rerank_compute_s)
    return {"images": n, "queries": queries, "shortlist": shortlist, "shard_shortlist": k_shard, "cluster": cluster.__dict__, "index": ip,
            "feature_shards": feature_shards, "index_shards": index_shards, "query_chunks": chunks,
            "stages": stages, "warnings": warnings, "rates": dict(RATES)}


def render_plan(p: dict) -> str:
    c = p["cluster"]
    lines = [f"Plan for {p['images']:,} gallery images and {p['queries']:,} queries on "
             f"{c['executors']} executors x {c['executor_cores']} cores, {c['executor_memory_gb']:g} GB"
             + (f", {c['gpus']} GPUs" if c["gpus"] else ""),
             f"index: {p['index']['index_key']} nprobe {p['index']['nprobe']}, shortlist {p['shortlist']:,} "
             f"({p['shard_shortlist']:,} per index shard), "
             f"training sample {p['index']['train_points']:,}; feature shards {p['feature_shards']:,}, "
             f"index shards {p['index_shards']:,}, query chunks {p['query_chunks']:,}",
             f"{'stage':<12} {'tasks':>9} {'wall':>10} {'storage':>12} {'mem/task':>11}  basis"]
    for name, s in p["stages"].items():
        lines.append(f"{name:<12} {s['tasks']:>9,} {_fmt_time(s['wall']):>10} {_fmt_bytes(s['storage']):>12} "
                     f"{_fmt_bytes(s['memory_per_task']):>11}  {s['basis']}")
    lines += [f"WARNING: {w}" for w in p["warnings"]]
    lines.append("Rates are per-core figures measured by tests/bench on a 2-core CPU machine (retrieval/plan.py "
                 "RATES), except the GPU rate and the executor read bandwidth, which are ASSUMED.")
    return "\n".join(lines)


def _run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> None:
    cluster = Cluster(executors=inputs["executors"], executor_memory_gb=parse_memory(inputs["executor_memory"]),
                      executor_cores=inputs["executor_cores"], gpus=inputs["gpus"])
    p = plan(int(inputs["images"]), cluster, queries=int(inputs["queries"]),
             shortlist=cfg["search.shortlist"], query_chunk=cfg["search.query_chunk"],
             row_group_size=cfg["extract.row_group_size"], cfg=cfg)
    print(render_plan(p))
    return None


STAGE = Stage(
    name="plan",
    help="capacity plan for N images from measured rates",
    usage="--images 1e9",
    args=(
        arg("--images", required=True, type=float, help="gallery images, e.g. 1e9"),
        arg("--queries", type=float, default=10_000_000, help="queries per search run"),
        arg("--executors", type=int, default=100, help="Spark executors"),
        arg("--executor-memory", default="16g", help="memory per executor"),
        arg("--executor-cores", type=int, default=4, help="cores per executor"),
        arg("--gpus", type=int, default=0, help="GPUs in the cluster (extraction on GPU executors)"),
    ),
    run=_run,
    engine=None,
    writes=False,
)
