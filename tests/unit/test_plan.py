import pytest

from retrieval import config
from retrieval.cli import main
from retrieval.plan import RATES, Cluster, index_params, parse_memory, plan


def test_plan_scales_with_images_and_cluster():
    small = plan(10_000_000, Cluster(executors=10))
    big = plan(1_000_000_000, Cluster(executors=10))
    more = plan(1_000_000_000, Cluster(executors=100))
    assert big["index_shards"] == 100 and small["index_shards"] == 1
    assert big["stages"]["extract"]["wall"] == pytest.approx(100 * small["stages"]["extract"]["wall"])
    assert more["stages"]["extract"]["wall"] == pytest.approx(big["stages"]["extract"]["wall"] / 10)
    assert big["stages"]["extract"]["storage"] == pytest.approx(1e9 * RATES["feature_bytes_per_image"])
    # model.runtime=auto (the default) and onnx: the extraction rate measured for the onnxruntime trunk;
    # torch: the torch rate
    onnx = plan(1_000_000_000, Cluster(executors=10), cfg=config.load(sets=["model.runtime=onnx"]))
    torch_ = plan(1_000_000_000, Cluster(executors=10), cfg=config.load(sets=["model.runtime=torch"]))
    assert onnx["stages"]["extract"]["wall"] == pytest.approx(big["stages"]["extract"]["wall"])
    assert big["stages"]["extract"]["wall"] == pytest.approx(
        torch_["stages"]["extract"]["wall"] * RATES["extract_images_per_core_s"] / RATES["extract_images_per_core_s_onnx"])
    assert "model.runtime=auto" in big["stages"]["extract"]["basis"]
    # and the rate of large photos (tests/bench/bench_decode.py), printed beside it
    assert "JPEG photos of 1-12 MP: " in big["stages"]["extract"]["basis"]
    assert f"({RATES['extract_images_per_core_s_large']} img/s/core)" in big["stages"]["extract"]["basis"]
    assert "model.runtime=auto" in torch_["stages"]["extract"]["basis"]     # what the default would take
    gpu = plan(1_000_000_000, Cluster(executors=10, gpus=8))
    assert "ASSUMED" in gpu["stages"]["extract"]["basis"]
    assert index_params(1_000_000_000)["nlist"] == 131072


def test_plan_uses_the_index_rule_and_models_the_rerank_reads():
    from retrieval import config
    from retrieval.index.params import choose_params

    p = index_params(10_000_000)
    real = choose_params(10_000_000, 128, config.load())
    assert (p["index_key"], p["nlist"], p["train_points"]) == (real.index_key, real.nlist, real.train_size)
    # the chunk-major rerank reads the row groups each query chunk touches: bigger chunks, fewer
    # gallery reads (at S = 500, where the reads dominate the rerank's compute)
    by_chunk = config.load(sets=["search.rerank=chunk"])
    small = plan(1_000_000_000, Cluster(), query_chunk=8192, shortlist=500, cfg=by_chunk)["stages"]["search"]
    big = plan(1_000_000_000, Cluster(), query_chunk=131072, shortlist=500, cfg=by_chunk)["stages"]["search"]
    assert big["wall"] < small["wall"] / 4
    assert any("query chunks reads" in w
               for w in plan(1_000_000_000, Cluster(), shortlist=500, cfg=by_chunk)["warnings"])
    # search.shortlist 0 (the default): the size rule of the search job
    from retrieval.search.coarse import auto_shortlist

    assert plan(10_000_000, Cluster())["shortlist"] == auto_shortlist(10_000_000) == 1050
    assert auto_shortlist(1_000_000) == auto_shortlist(1000) == 200
    # above 16,384 cells the quantizer is HNSW, as index makes it
    assert index_params(1_000_000_000)["quantizer"] == "hnsw" and index_params(10_000_000)["quantizer"] == "flat"
    # every (query, index shard) pays the cell assignment: fewer, bigger shards, less coarse work
    few = plan(1_000_000_000, Cluster(), vectors_per_index_shard=100_000_000)["stages"]["search"]["wall"]
    many = plan(1_000_000_000, Cluster(), vectors_per_index_shard=10_000_000)["stages"]["search"]["wall"]
    assert few < many


def test_plan_models_the_gallery_major_rerank():
    """The default (search.rerank auto) at a billion: each block of the fine column read once,
    whatever the chunk size; over the feature files the query vectors once per block; the pairs'
    shuffle; bounded memory."""
    from retrieval import config

    files_cfg = ["search.fine_layout=files"]
    p = plan(1_000_000_000, Cluster(), cfg=config.load(sets=files_cfg))
    rr = p["stages"]["search"]["rerank"]
    assert rr["mode"] == "gallery" and rr["gallery_bytes"] <= 1.5 * rr["column_bytes"]
    assert rr["blocks"] == 481                                   # 516 GB in 1 GiB blocks
    # 2.4 query rows per image with the default query regions (content box on ~40%, centre crop)
    assert rr["query_rows"] == pytest.approx(24_000_000)
    assert rr["query_bytes"] == pytest.approx(481 * 24_000_000 * 516 * rr["query_touched"])
    assert rr["shuffle_bytes"] >= 2e10 * 16                       # every pair travels to its block
    assert "1.00x the column" in p["stages"]["search"]["basis"]
    # the result rows' labels: once per run (gallery-major), not per chunk
    assert rr["label_bytes"] <= 1e9 * 140 < plan(1_000_000_000, Cluster(), cfg=config.load(
        sets=["search.rerank=chunk"]))["stages"]["search"]["rerank"]["label_bytes"] / 50
    assert p["stages"]["search"]["memory_per_task"] < 4e9        # fits 16 GB / 4 cores
    bigger_chunks = plan(1_000_000_000, Cluster(), query_chunk=65536, cfg=config.load(sets=files_cfg))
    assert bigger_chunks["stages"]["search"]["rerank"]["gallery_bytes"] == rr["gallery_bytes"]
    chunk_major = plan(1_000_000_000, Cluster(), cfg=config.load(sets=["search.rerank=chunk"]))
    assert chunk_major["stages"]["search"]["wall"] > 50 * p["stages"]["search"]["wall"]
    # larger blocks: fewer reads of the query vectors, more memory per block task
    big = plan(1_000_000_000, Cluster(), cfg=config.load(sets=[*files_cfg, "search.vector_cache_mb=4096"]))
    assert big["stages"]["search"]["rerank"]["query_bytes"] < rr["query_bytes"] / 3
    assert any(w.startswith("search: ") and "per task" in w for w in big["warnings"])


def test_plan_models_the_list_ordered_fine_copy():
    """The default index writes the fine column by IVF list: a query row's vector goes to at most
    nprobe blocks (issue 25: <= 0.5 TB of query-side reads for 10M query images at a billion, the
    gallery read <= 1.5x); the copy costs a read and a write of the column at build time."""
    from retrieval import config

    p = plan(1_000_000_000, Cluster())
    rr, files = p["stages"]["search"]["rerank"], plan(1_000_000_000, Cluster(), cfg=config.load(
        sets=["search.fine_layout=files"]))
    assert rr["layout"] == "lists" and rr["blocks"] == 481 and 15 < rr["query_blocks"] <= 16
    assert rr["query_bytes"] == pytest.approx(24_000_000 * 516 * (1 + rr["query_blocks"]))
    assert rr["query_bytes"] <= 0.5e12 < files["stages"]["search"]["rerank"]["query_bytes"] / 10
    assert rr["gallery_bytes"] <= 1.5 * rr["column_bytes"]
    assert "list-ordered copy" in p["stages"]["search"]["basis"]
    assert p["stages"]["search"]["wall"] < files["stages"]["search"]["wall"]
    assert p["stages"]["index"]["storage"] == pytest.approx(files["stages"]["index"]["storage"])
    no_copy = plan(1_000_000_000, Cluster(), cfg=config.load(sets=["index.fine_by_list=false"]))
    assert no_copy["stages"]["index"]["storage"] == pytest.approx(p["stages"]["index"]["storage"] - 516e9)
    assert "layout" not in no_copy["stages"]["search"]["rerank"]
    assert any("index.fine_by_list" in w for w in no_copy["warnings"])


def test_plan_models_shard_lists_and_the_fused_plan():
    """Each shard ships K' (the binomial bound) per query, not S; one shard group: no shuffle."""
    from retrieval.search.coarse import shard_shortlist

    p = plan(1_000_000_000, Cluster())
    assert p["index_shards"] == 100 and p["shard_shortlist"] == shard_shortlist(2000, 100) < 2000 / 10
    assert f"shuffle {p['shard_shortlist']} per shard" in p["stages"]["search"]["basis"]
    small = plan(1_000_000, Cluster())           # 1 index shard: coarse + merge + rerank in one task
    assert small["shard_shortlist"] == small["shortlist"] and "shuffle 200 per shard: 0.0 B" in \
        small["stages"]["search"]["basis"] and small["stages"]["search"]["tasks"] == small["query_chunks"]
    # fast-scan where the 10M-vector shards fill its blocks, 8-bit PQ with small shards
    assert index_params(10**9, vectors_per_shard=10**7)["fast_scan"]
    assert not index_params(10**9, vectors_per_shard=500_000)["fast_scan"]


def test_plan_warns_when_a_task_does_not_fit():
    p = plan(1_000_000_000, Cluster(executors=10, executor_memory_gb=1, executor_cores=4))
    assert any(w.startswith("index") for w in p["warnings"])


def test_plan_cli(capsys):
    assert main(["plan", "--images", "1e9", "--executors", "50", "--executor-memory", "32g", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "Plan for 1,000,000,000 gallery images" in out and "IVF131072_HNSW32,PQ32x4fs" in out   # 10M-vector shards: fast-scan
    with pytest.raises(ValueError):
        parse_memory("lots")


def test_plan_has_a_duplicates_line_from_the_search_model():
    """retrieval duplicates = the search with every gallery image a query, plus the components' shuffles."""
    p = plan(1_000_000, Cluster(executors=10))
    self_search = plan(1_000_000, Cluster(executors=10), queries=1_000_000)["stages"]["search"]
    dup = p["stages"]["duplicates"]
    assert dup["wall"] > self_search["wall"] and dup["tasks"] > self_search["tasks"]
    assert dup["memory_per_task"] == self_search["memory_per_task"] and "components" in dup["basis"]
    assert not any(w.startswith("duplicates:") for w in p["warnings"])
    assert dup["slices"] == 1
    # 1e9: unsliced, a block task would hold ~150 GB of pairs; in slices it fits a core's 4 GB
    big = plan(1_000_000_000, Cluster())
    d = big["stages"]["duplicates"]
    assert d["wall"] > big["stages"]["search"]["wall"]
    assert d["unsliced_memory_per_task"] > 100e9 and d["memory_per_task"] < 4e9 and d["slices"] > 10
    assert d["slices"] * d["slice_images"] >= 1e9 and "slices of" in d["basis"]
    assert not any(w.startswith("duplicates:") for w in big["warnings"])
    # slices sized by slice_mb: half the budget, about twice the slices and less memory per task
    half = plan(1_000_000_000, Cluster(), cfg=config.load(sets=["duplicates.slice_mb=1024"]))["stages"]["duplicates"]
    assert 1.8 < half["slices"] / d["slices"] < 2.2 and half["memory_per_task"] < d["memory_per_task"]
    # a configured slice size is used as it is; too large a one is warned about
    one = plan(1_000_000_000, Cluster(), cfg=config.load(sets=["duplicates.slice_images=1000000000"]))
    assert one["stages"]["duplicates"]["slices"] == 1 and any(w.startswith("duplicates:") for w in one["warnings"])
