"""``retrieval plan``: a capacity plan for N images from rates measured by the benchmarks here.

Every rate below is a figure measured on this project's 2-core CPU machine by the named benchmark
(per core), except the GPU extraction rate, which is NOT measured here (no GPU was available) and is
marked as an assumption. The model is deliberately simple and says what each stage's cost grows with:

- extract: images / (rate per core x cores) (or per GPU); bounded by decode + forward; storage =
  bytes per image measured on disk (int8 fine + float32 coarse, zstd).
- build-index: training on a bounded sample (grows with nlist, not N) + adding N vectors (linear in N,
  parallel over shards) + writing N x bytes/vector.
- search: coarse cost grows with queries x nprobe x N / nlist (codes scanned) spread over all cores;
  the rerank reads, per query chunk, the gallery row groups its shortlists touch (at billion scale:
  about every row group of the gallery's fine column once per chunk) and scores queries x shortlist
  x 512 multiply-adds.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

# ---- measured here (2-core CPU machine); see README "Benchmarks" for the commands -------------
RATES = {
    # tests/bench/bench_extract.py: Spark local[2] gallery extraction, images/s per core
    "extract_images_per_core_s": 9.0,
    # NOT measured here (no GPU lent): MobileNetV2 224 px fp32 on a T4-class GPU incl. JPEG decode on
    # 8 CPU cores feeding it; an assumption, replace with your own measurement.
    "extract_images_per_gpu_s": 1200.0,
    # tests/bench/bench_extract.py: bytes on disk per image (int8 fine + float32 coarse, zstd)
    "feature_bytes_per_image": 1261.0,
    # tests/bench/bench_index.py: vectors added per second per core (IVF-PQ add, encoding included)
    "index_add_vectors_per_core_s": 150_000.0,
    # tests/bench/bench_scale.py: k-means training work, (point x centroid) distance evaluations
    # x iterations per second per core (train_s of the 10M build: flat k-means + PQ codebooks)
    "index_train_point_centroids_per_core_s": 2.5e10,
    # tests/bench/bench_index.py: bytes per vector on disk, whole sharded index (codes + ids + lists)
    "index_bytes_per_vector": 24.0,
    # tests/bench/bench_search.py: PQ codes scanned per second per core in the coarse stage
    "coarse_codes_per_core_s": 4.0e8,
    # tests/bench/bench_search.py: rerank (query, candidate) pairs scored per second per core,
    # fetching included, when the gallery's fine vectors are read from local Parquet
    "rerank_pairs_per_core_s": 2.0e6,
    # tests/bench/bench_scale.py: nprobe / nlist chosen by the build-time tuning at 10M vectors
    # (99.5% of hard copies' source cells probed)
    "nprobe_fraction": 1 / 128,
    # read bandwidth per executor from object storage / HDFS (assumption for a cluster)
    "read_bytes_per_executor_s": 200e6,
}


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


def index_params(n: int, cfg=None) -> dict:
    """The parameters ``retrieval build-index`` would choose for ``n`` vectors under ``cfg``
    (:func:`retrieval.index.params.choose_params`: nlist ~ 4 sqrt(N), PQ bytes from the memory
    budget, the training sample), and the nprobe its tuning would land on: the measured share of
    cells (``nprobe_fraction``), within the tuning grid's cap ``index.max_nprobe``."""
    from retrieval import config
    from retrieval.index.params import choose_params

    cfg = cfg if cfg is not None else config.load()
    p = choose_params(max(int(n), 1), int(cfg["model.coarse_dim"]), cfg)
    wanted = max(1, math.ceil(p.nlist * RATES["nprobe_fraction"]))
    cap = min(p.nlist, int(cfg["index.max_nprobe"]))
    return {"index_key": p.index_key, "nlist": p.nlist, "pq_bytes": p.pq_bytes, "nprobe": min(wanted, cap),
            "nprobe_wanted": wanted, "train_points": p.train_size, "kmeans": p.kmeans,
            "kmeans_iters": p.kmeans_iters, "bytes_per_vector": p.bytes_per_vector_est}


def _centroid_work(ip: dict) -> float:
    """Centroid distance computations per training point per k-means iteration."""
    return ip["nlist"] if ip["kmeans"] == "flat" else 2 * math.sqrt(ip["nlist"])


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


def plan(images: int, cluster: Cluster, queries: int = 10_000_000, shortlist: int = 500,
         vectors_per_index_shard: int = 10_000_000, images_per_feature_shard: int = 250_000,
         query_chunk: int = 8192, row_group_size: int = 1024, cfg=None) -> dict:
    r = RATES
    n = int(images)
    ip = index_params(n, cfg)
    cores = cluster.cores
    # extract: linear in N, embarrassingly parallel
    feature_shards = max(1, math.ceil(n / images_per_feature_shard))
    if cluster.gpus:
        extract_s = n / (r["extract_images_per_gpu_s"] * cluster.gpus)
        extract_basis = f"{cluster.gpus} GPUs x {r['extract_images_per_gpu_s']:.0f} img/s (ASSUMED, not measured here)"
    else:
        extract_s = n / (r["extract_images_per_core_s"] * cores)
        extract_basis = f"{cores} cores x {r['extract_images_per_core_s']} img/s/core (measured here)"
    feature_bytes = n * r["feature_bytes_per_image"]
    # index: training on a bounded sample (driver), then adding N vectors in parallel shards
    index_shards = max(1, math.ceil(n / vectors_per_index_shard))
    train_s = ip["train_points"] * _centroid_work(ip) * ip["kmeans_iters"] \
        / (r["index_train_point_centroids_per_core_s"] * max(1, cluster.executor_cores))
    add_s = n / (r["index_add_vectors_per_core_s"] * min(cores, index_shards * cluster.executor_cores))
    index_bytes = n * r["index_bytes_per_vector"]
    shard_bytes = min(n, vectors_per_index_shard) * r["index_bytes_per_vector"]
    # search: coarse = codes scanned (queries x nprobe x N / nlist); rerank = pairs scored, and per
    # query chunk the gallery row groups its shortlists touch (Poisson: 1 - exp(-chunk x S x R / N))
    codes_scanned = queries * ip["nprobe"] * n / ip["nlist"]
    coarse_s = codes_scanned / (r["coarse_codes_per_core_s"] * cores)
    chunks = max(1, math.ceil(queries / query_chunk))
    rerank_pairs = queries * shortlist
    rerank_compute_s = rerank_pairs / (r["rerank_pairs_per_core_s"] * cores)
    fine_bytes = n * 516.0
    touched = 1.0 - math.exp(-min(queries, query_chunk) * shortlist * row_group_size / max(n, 1))
    rerank_read_bytes = chunks * fine_bytes * touched
    rerank_read_s = rerank_read_bytes / (r["read_bytes_per_executor_s"] * cluster.executors)
    rerank_s = max(rerank_compute_s, rerank_read_s)
    mem_gb = cluster.executor_memory_gb / max(1, cluster.executor_cores)
    stages = {
        "extract": {"tasks": feature_shards, "basis": extract_basis, "wall": extract_s,
                    "storage": feature_bytes, "memory_per_task": 0.6e9 + 1024 * 2600},
        "build-index": {"tasks": index_shards, "wall": train_s + add_s + 60,
                        "basis": f"train {ip['train_points']:,} pts x {ip['kmeans']} k-means on the driver "
                                 f"({_fmt_time(train_s)}), add at {r['index_add_vectors_per_core_s']:,.0f} "
                                 "vec/s/core (measured here)",
                        "storage": index_bytes, "memory_per_task": 1.3 * shard_bytes + ip["nlist"] * 128 * 4 * 2},
        "search": {"tasks": index_shards * chunks + chunks, "wall": coarse_s + rerank_s,
                   "basis": f"coarse {codes_scanned:.3g} codes at {r['coarse_codes_per_core_s']:.2g}/s/core "
                            f"({_fmt_time(coarse_s)}); rerank {rerank_pairs:.3g} pairs (compute "
                            f"{_fmt_time(rerank_compute_s)}), gallery fine reads {_fmt_bytes(rerank_read_bytes)} "
                            f"({touched:.0%} of the fine column per chunk, {_fmt_time(rerank_read_s)})",
                   "storage": queries * 10 * 120.0,
                   "memory_per_task": shard_bytes * 1.2 + query_chunk * shortlist * 24 + 131072 * 2048},
    }
    warnings = [f"{name}: {_fmt_bytes(s['memory_per_task'])} per task > {mem_gb:.1f} GB per core"
                for name, s in stages.items() if s["memory_per_task"] > mem_gb * 1e9]
    if ip["nprobe"] < ip["nprobe_wanted"]:
        warnings.append(f"search: nprobe {ip['nprobe']} is the tuning cap (index.max_nprobe); the measured "
                        f"share of cells ({r['nprobe_fraction']:.4f}) would be {ip['nprobe_wanted']} at "
                        f"{ip['nlist']:,} cells: raise index.max_nprobe for the same recall, at "
                        f"{ip['nprobe_wanted'] / ip['nprobe']:.1f}x the coarse cost")
    return {"images": n, "queries": queries, "cluster": cluster.__dict__, "index": ip,
            "feature_shards": feature_shards, "index_shards": index_shards, "query_chunks": chunks,
            "stages": stages, "warnings": warnings, "rates": dict(RATES)}


def render(p: dict) -> str:
    c = p["cluster"]
    lines = [f"Plan for {p['images']:,} gallery images and {p['queries']:,} queries on "
             f"{c['executors']} executors x {c['executor_cores']} cores, {c['executor_memory_gb']:g} GB"
             + (f", {c['gpus']} GPUs" if c["gpus"] else ""),
             f"index: {p['index']['index_key']} nprobe {p['index']['nprobe']}, "
             f"training sample {p['index']['train_points']:,}; feature shards {p['feature_shards']:,}, "
             f"index shards {p['index_shards']:,}, query chunks {p['query_chunks']:,}",
             f"{'stage':<12} {'tasks':>9} {'wall':>10} {'storage':>12} {'mem/task':>11}  basis"]
    for name, s in p["stages"].items():
        lines.append(f"{name:<12} {s['tasks']:>9,} {_fmt_time(s['wall']):>10} {_fmt_bytes(s['storage']):>12} "
                     f"{_fmt_bytes(s['memory_per_task']):>11}  {s['basis']}")
    lines += [f"WARNING: {w}" for w in p["warnings"]]
    lines.append("Rates are per-core figures measured by tests/bench on a 2-core CPU machine, except where "
                 "marked ASSUMED.")
    return "\n".join(lines)


def run_cli(args, cfg, spark) -> dict:
    cluster = Cluster(executors=args.executors, executor_memory_gb=parse_memory(args.executor_memory),
                      executor_cores=args.executor_cores, gpus=args.gpus)
    p = plan(int(args.images), cluster, queries=int(getattr(args, "queries", 10_000_000)),
             shortlist=cfg["search.shortlist"], query_chunk=cfg["search.query_chunk"],
             row_group_size=cfg["extract.row_group_size"], cfg=cfg)
    print(render(p))
    return None
