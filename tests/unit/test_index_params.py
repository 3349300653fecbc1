"""Index parameter rule, training sample, duplicate rule, bad-vector rule, top-k merge (no Spark)."""
from __future__ import annotations

import retrieval.index  # noqa: F401  (before faiss)
import numpy as np
import pyarrow as pa
import pytest

from retrieval import config
from retrieval.config import ConfigError
from retrieval.index import dedup
from retrieval.index.params import choose_nlist, choose_params, nprobe_grid
from retrieval.index.quality import Partial, _topk
from retrieval.index.reader import clean
from retrieval.index.quantizer import sample_mask


def test_nlist_rule():
    assert choose_nlist(1_000_000) == 4096            # 4 * sqrt(1e6) = 4000 -> 4096
    assert choose_nlist(100_000_000) == 32768         # 40,000 -> 32,768
    assert choose_nlist(10_000) == 256                # 400 -> 512, capped by 10,000 / 39 -> 256
    assert choose_nlist(50) == 1
    for n in (1000, 20_000, 3_000_000):
        nlist = choose_nlist(n)
        assert nlist & (nlist - 1) == 0 and n / nlist >= 39


def test_params_from_budget():
    cfg = config.load()
    p = choose_params(1_000_000, 128, cfg)
    # 16 bytes of code: 32 fast-scan 4-bit sub-quantizers by default, 16 8-bit ones without fast-scan
    assert (p.index_key, p.nlist, p.pq_m, p.pq_nbits, p.pq_bytes, p.train_size) == \
        ("IVF4096,PQ32x4fs", 4096, 32, 4, 16, 4096 * 40)
    assert p.kmeans == "flat" and max(p.nprobe_grid) == 256
    p8 = choose_params(1_000_000, 128, config.load(sets=["index.fast_scan=false"]))
    assert (p8.index_key, p8.pq_m, p8.pq_nbits, p8.pq_bytes) == ("IVF4096,PQ16", 16, 8, 16)
    assert choose_params(1_000_000, 128, cfg, fast_scan=False).index_key == "IVF4096,PQ16"
    # the budget decides when it is tighter than the objective's cap
    for fs in (True, False):
        assert choose_params(1_000_000, 128, config.load(sets=["index.bytes_per_vector=20"]), fast_scan=fs).pq_bytes == 8
        assert choose_params(1_000_000, 128, config.load(sets=["index.max_pq_bytes=64"]), fast_scan=fs).pq_bytes == 32
    # estimated bytes/vector within the budget
    for bpv in (12, 20, 40, 64):
        for fs in (True, False):
            p = choose_params(1_000_000, 128, config.load(sets=[f"index.bytes_per_vector={bpv}"]), fast_scan=fs)
            assert p.bytes_per_vector_est <= bpv and p.pq_m % (2 if fs else 1) == 0
    with pytest.raises(ConfigError, match="bytes_per_vector"):
        choose_params(1_000_000, 128, config.load(sets=["index.bytes_per_vector=8"]))
    big = choose_params(10**9, 128, cfg)
    # 500k-vector shards over 131,072 lists hold ~4 vectors per list: fast-scan blocks (32) would be
    # mostly padding, so 8-bit PQ; with a cluster's 10M-vector shards (76 per list) fast-scan
    assert big.index_key == "IVF131072_HNSW32,PQ16" and big.kmeans == "two_level"
    big_shards = choose_params(10**9, 128, config.load(sets=["index.vectors_per_shard=10000000"]))
    assert big_shards.index_key == "IVF131072_HNSW32,PQ32x4fs"
    assert big_shards.bytes_per_vector_est == pytest.approx(16 * (1 + 16 * 131072 / 1e7) + 8 + 0.07, abs=0.05)
    assert choose_params(10**7, 128, cfg).index_key == "IVF16384,PQ16"          # 30 per list at 500k/shard
    # the padding counts: 1M in 500k shards, 4,096 lists -> 16 B x (1 + 16 x 4096 / 500k) = 18.1 B of codes
    assert choose_params(1_000_000, 128, cfg).bytes_per_vector_est == pytest.approx(18.10 + 8 + 2.13, abs=0.05)
    assert big.train_size == cfg["index.max_train_points"]
    assert choose_params(500, 128, cfg).index_key == "IVF1,Flat"


def test_forced_key():
    p = choose_params(10**6, 128, config.load(sets=["index.index_key=OPQ16_64,IVF1024,PQ16x4fs"]))
    assert (p.nlist, p.pq_m, p.pq_nbits, p.pq_bytes, p.forced) == (1024, 16, 4, 8, True)
    with pytest.raises(ConfigError, match="IVF"):
        choose_params(10**6, 128, config.load(sets=["index.index_key=HNSW32"]))


def test_nprobe_grid():
    assert nprobe_grid(4096) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert nprobe_grid(48) == (1, 2, 4, 8, 16, 32, 48)
    assert nprobe_grid(1) == (1,)


def test_sample_mask_is_uniform_and_batch_independent():
    rate, n = 0.1, 300_000
    whole = sample_mask(3, 7, 0, n, rate)
    parts = np.concatenate([sample_mask(3, 7, a, min(12_345, n - a), rate) for a in range(0, n, 12_345)])
    assert (whole == parts).all()
    assert abs(whole.mean() - rate) < 0.005
    # uniform over the file: each tenth holds about a tenth of the sample
    counts = whole.reshape(10, -1).sum(axis=1)
    assert counts.min() > 0.9 * counts.mean()
    assert not (sample_mask(3, 8, 0, n, rate) == whole).all()  # another file, another draw
    assert sample_mask(3, 7, 0, 10, 1.0).all()


def test_clean_rule():
    x = np.array([[1, 0, 0], [np.nan, 0, 0], [0, 0, 0], [3, 4, 0], [np.inf, 1, 1]], np.float32)
    valid, nan_inf, zero, renorm = clean(x)
    assert valid.tolist() == [True, False, False, True, False]
    assert nan_inf.tolist() == [False, True, False, False, True]
    assert zero.tolist() == [False, False, True, False, False]
    assert renorm == 1 and np.allclose(x[3], [0.6, 0.8, 0])


def test_duplicate_rule_first_occurrence_wins():
    occ = pa.table({"image_id": ["a", "b", "a", "a", "b", "c", "c"],
                    "file_no": [0, 0, 2, 1, 3, 2, 2], "row": [5, 6, 1, 9, 0, 4, 2]},
                   schema=dedup.ID_SCHEMA)
    # files 0-1 are already indexed: only rows of files >= 2 can be skipped
    d = dedup.resolve_duplicates(occ, first_new=2)
    assert d.count == 3  # a@(2,1), b@(3,0), c@(2,4) ; a@(1,9) is old, c@(2,2) is c's first
    assert d.skip[2].tolist() == [1, 4] and d.skip[3].tolist() == [0]
    ex = {e["image_id"]: e for e in d.examples}
    assert ex["a"]["kept"] == [0, 5] and ex["c"]["kept"] == [2, 2]
    assert d.rows_in(2, 0, 3).tolist() == [1] and d.rows_in(5, 0, 9).tolist() == []


def test_topk_merge_is_order_free():
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(4):
        s = rng.integers(0, 5, (3, 6)).astype(np.float32)  # many ties
        i = rng.choice(1000, (3, 6), replace=False).astype(np.int64)
        parts.append(Partial(3, 4, None, {8: _topk(s, i, 4)[:2]}))
    a = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3]))
    b = parts[3].merge(parts[2]).merge(parts[1]).merge(parts[0])
    assert (a.approx[8][1] == b.approx[8][1]).all() and (a.approx[8][0] == b.approx[8][0]).all()
    s_all = np.concatenate([p.approx[8][0] for p in parts], 1)
    assert np.allclose(a.approx[8][0], -np.sort(-s_all, axis=1)[:, :4])
