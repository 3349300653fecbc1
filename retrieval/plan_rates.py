"""The rates of ``retrieval plan`` (:mod:`retrieval.plan`): each measured on this project's 2-core CPU
machine by the named benchmark (per core), except the ASSUMPTIONS marked as such."""
from __future__ import annotations

RATES = {
    # tests/bench/bench_extract.py (22 Nov, quiet machine): Spark local[2] gallery extraction of 256
    # real images, warm workers: 61.0 img/s on 2 cores (0.97 of the bare forward); the first job of
    # a session (Python workers start, model built in each): 24.4 img/s. Under load (21 Nov): 17 img/s
    "extract_images_per_core_s": 30.5,
    # model.runtime=auto (the default; the trunk on onnxruntime, the ONNX file made by the driver) or onnx:
    # the Spark gallery job (default settings, 512 images of the bundled sample, local[2]) ran 3.93x the
    # model.runtime=torch one, alternated 3 times in one run on 6 Dec (tests/bench/bench_extract.py
    # --compare-only --compare-set model.runtime=torch: 16.27 vs 4.14 img/s, 8.1 vs 2.1 per core, on a
    # machine shared by 8 jobs, load ~18); explicit runtime=onnx on 4 Dec: 3.32x / 3.59x. The ratio
    # times the torch rate above (a quiet machine's)
    # With the fast decoders and decode threads as well (preprocess.decoder: fast, extract.decode_threads:
    # auto, the defaults since 0.3): tests/bench/bench_decode.py (6 Dec, shared machine, load ~17), the
    # Spark job local[2], 2 rounds: 4.60x the 0.2 default (torch + Pillow inline) on the bundled
    # sample, 2.13x on 54 photos of 1-12 MP (JPEG, PNG, WebP). The sample ratio times the torch rate:
    "extract_images_per_core_s_onnx": round(30.5 * 4.60, 1),
    # JPEG photos of 1-12 MP with the default: tests/bench/bench_decode.py --rounds 3 --no-local --no-stages (7 Dec
    # 02:47, shared machine, load ~10-20), the Spark job local[2] with warm workers, the tasks' CPU per image
    # (shard cpu_s, every thread, after the model setup): 21.7 ms on 300 JPEGs of 1-12 MP vs 12.2 ms on the
    # bundled sample (0.562x), times the sample rate above. (There: 3.41x the 0.2 default per core on those
    # JPEGs, 3.31x in wall; 5.66x on the sample; 1-4 MP PNG 66.1 ms, 1.86x; WebP 37.3 ms, 2.47x; all 420
    # large photos 30.3 ms, 2.76x. The run before the last two cuts, 02:20: 21.6 vs 12.4 ms, 3.10x.)
    "extract_images_per_core_s_large": round(30.5 * 4.60 * 12.2 / 21.7, 1),
    # ASSUMED, NOT measured here (no GPU lent): MobileNetV2 224 px fp32 on a T4-class GPU incl. JPEG
    # decode on ~8 CPU cores feeding it; replace with your own measurement.
    "extract_images_per_gpu_s": 1200.0,
    # tests/bench/bench_extract.py (22 Nov 02:30): bytes on disk per real image (int8 fine codes as
    # fixed_size_binary + float32 coarse, vector columns uncompressed, the others zstd);
    # bench_scale.py's synthetic rows: 1,041
    "feature_bytes_per_image": 1177.0,
    # tests/bench/bench_scale.py (10M, quiet run of 22 Nov): flat k-means, (training point x centroid)
    # evaluations x iterations per second per core: 655,108 x 16,384 x 10 in 134 s on 2 cores
    "index_train_point_centroids_per_core_s": 4.0e8,
    # tests/bench/bench_scale.py (10M, quiet run): vectors added per second per core, everything in
    # the shard tasks included (read, flat-quantizer assignment to 16,384 cells, PQ16 encoding, write,
    # build-time quality): 10,000,000 in 255 s on 2 cores
    "index_add_vectors_per_core_s": 19_600.0,
    # tests/bench/bench_scale.py: bytes per vector on disk, whole sharded index at 10M (PQ16 codes +
    # int64 ids + list overhead + trained part / N)
    "index_bytes_per_vector": 25.4,
    # tests/bench/bench_remove.py (1M, 1% removed; docs/lifecycle.md): ids scanned /s/core by remove; search time ratio
    # (6 Dec, loaded machine: 1M ids in 0.7 / 1.3 s, the slower; search ratio medians 1.03 / 1.14, the higher)
    "remove_ids_scanned_per_core_s": 7.7e5,
    "search_tombstone_ratio": 1.14,
    # tests/bench/bench_scale.py (coarse rates): flat quantizer assignment, multiply-adds per core-second
    "flat_assign_macs_per_core_s": 3.3e10,
    # tests/bench/bench_scale.py (coarse rates): HNSW32 over 131,072 centroids (the quantizer of a
    # billion-vector index), queries per core-second at efSearch 16 / k 1 (add) and at k = 256 (search)
    "hnsw_assign_add_per_core_s": 19_200.0,
    "hnsw_assign_search256_per_core_s": 1_450.0,
    # tests/bench/bench_scale.py (coarse rates): PQ16 codes scanned per core-second (nprobe 1 vs 128
    # on a 500k-vector shard, top-500 kept)
    "coarse_codes_per_core_s": 3.1e7,
    # 4-bit fast-scan codes (PQ32x4fs, the default where shards fill its blocks) scanned per
    # core-second: 1M search benchmark index, one 500k-vector shard, 5,000 queries, nprobe 1 vs 128,
    # top 127 kept (K' of 2 shards at S = 200), one thread, cells preassigned (22 Nov, quiet machine)
    "coarse_fs_codes_per_core_s": 5.6e8,
    # tests/bench/bench_scale.py (10M, 22 Nov): rerank (query, candidate) pairs scored per core-second
    # by the int8 kernel, the marginal cost (shortlist 1050 vs 500: 5.5M more pairs, rerank 8.55 s
    # vs 6.49 s)
    "rerank_pairs_per_core_s": 1.3e6,
    # tests/bench/bench_scale.py (10M, 22 Nov): gallery fine column (int8 fixed_size_binary + scale,
    # 516 B/row) read from local Parquet (page cache) and decoded by the rerank, bytes per
    # core-second: 19,600 row groups (10.3 GB) in the 6.49 s rerank at shortlist 500, less its 5M
    # pairs at the rate above (~4.6 s on 2 cores); one file's column alone: 1.15e9 B/s on 1 core
    "fine_decode_bytes_per_core_s": 1.1e9,
    # ASSUMED: read bandwidth per executor from object storage / HDFS on a cluster
    "read_bytes_per_executor_s": 200e6,
}


CONTENT_BOX_SHARE = 0.4     # query images with a content box (extract.query_regions: content): 2.4 rows/image


def query_rows_per_image(cfg) -> float:
    """Query feature rows per query image: 1, plus one per ``extract.query_regions`` region (the
    content box only where one is found: ~40% of photos; 2.4 rows per image with the default regions)."""
    regions = list(cfg["extract.query_regions"] or [])
    return 1.0 + sum(CONTENT_BOX_SHARE if r == "content" else 1.0 for r in regions)


def by_list(cfg) -> bool:
    """Whether the gallery-major rerank runs over the index's list-ordered fine copy."""
    return bool(cfg["index.fine_by_list"]) and str(cfg["search.fine_layout"]) != "files"
