"""Coarse merge and exact rerank on real faiss indexes and real feature Parquet (no Spark)."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from tests import synthetic
from retrieval.extract.job import read_features
from retrieval.index import idmap
from retrieval.schema import fine_matrix
from retrieval.search import coarse, rerank
from retrieval.search.queries import Chunk
from retrieval.search.tasks import SearchJob, chunk_task

N, NQ = 6000, 300
SPEC = synthetic.SyntheticSpec(n_clusters=200, seed=7)


@pytest.fixture(scope="module")
def data():
    g_coarse, g_fine = synthetic.gallery(N, SPEC)
    q_coarse, q_fine, source = synthetic.queries(N, NQ // 2, NQ - NQ // 2, SPEC)
    return (g_coarse, g_fine, q_coarse.astype(np.float32), q_fine.astype(np.float32), source)


@pytest.fixture(scope="module")
def gallery_output(tmp_path_factory, data):
    g_coarse, g_fine, *_ = data
    url = str(tmp_path_factory.mktemp("gal") / "features")
    # 3 files, small row groups: the rerank must pick the right rows from the right groups
    synthetic.write_feature_output(url, g_coarse, g_fine, num_files=3, storage="int8", row_group_size=256)
    return url


def gallery_ids(n: int = N, files: int = 3) -> np.ndarray:
    """The int64 id of each gallery row as written by write_feature_output (contiguous files)."""
    bounds = np.linspace(0, n, files + 1).astype(int)
    out = np.empty(n, np.int64)
    for f in range(files):
        out[bounds[f]:bounds[f + 1]] = idmap.encode_ids(f, np.arange(bounds[f + 1] - bounds[f]))
    return out


def feature_urls(url: str, files: int = 3) -> list[str]:
    return [f"{url}/part-{f:05d}.parquet" for f in range(files)]


def _ivfpq(train: np.ndarray) -> faiss.Index:
    index = faiss.index_factory(128, "IVF32,PQ16x4", faiss.METRIC_INNER_PRODUCT)  # 4-bit: fast to train
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)   # k-means under a loaded machine: one thread is the quickest
    try:
        index.train(train)
    finally:
        faiss.omp_set_num_threads(threads)
    return index


@pytest.mark.parametrize("kind", ["ivfpq", "flat"])
def test_merged_shortlist_equals_single_index(data, kind):
    g_coarse, _, q_coarse, _, _ = data
    ids = gallery_ids()
    if kind == "ivfpq":
        trained = _ivfpq(g_coarse[:4000])
        make = lambda: faiss.clone_index(trained)  # noqa: E731 - same codebooks in every shard
    else:
        make = lambda: faiss.IndexIDMap2(faiss.IndexFlatIP(128))  # noqa: E731
    single = make()
    single.add_with_ids(g_coarse, ids)
    cut = [0, 1000, 3500, N]   # uneven shards
    shards = []
    for a, b in zip(cut[:-1], cut[1:]):
        s = make()
        s.add_with_ids(g_coarse[a:b], ids[a:b])
        shards.append(s)
    for ix in [single, *shards]:
        if kind == "ivfpq":
            faiss.extract_index_ivf(ix).nprobe = 8
    S = 50
    ref_s, ref_i = single.search(q_coarse, S)
    parts = [coarse.search_shard(s, q_coarse, S) for s in shards]
    got_s, got_i = coarse.merge_shortlists(parts, S)
    assert got_i.shape == (NQ, S)
    for r in range(NQ):
        # equal sets; ties at the S-th score may be cut at a different id, so compare above it
        kth = ref_s[r, -1]
        assert set(ref_i[r][ref_s[r] > kth]) == set(got_i[r][got_s[r] > kth])
        np.testing.assert_allclose(np.sort(got_s[r]), np.sort(ref_s[r]), rtol=0, atol=1e-6)
    # the order the shards are merged in does not matter
    rev_s, rev_i = coarse.merge_shortlists(parts[::-1], S)
    assert all(set(a) == set(b) for a, b in zip(rev_i, got_i))
    # folding one shard at a time (the local engine) keeps the same set
    run = parts[0]
    for p in parts[1:]:
        run = coarse.merge_shortlists([run, p], S)
    assert all(set(a) == set(b) for a, b in zip(run[1], got_i))


def test_topk_rows_equals_a_full_sort_with_ties_and_empties():
    """The compiled selection against sorting every row by (score desc, id asc): heavy ties (4
    score levels), empty entries (-1 ids, -inf scores), rows shorter than k."""
    rng = np.random.default_rng(2)
    n, m, k = 400, 60, 25
    scores = rng.integers(0, 4, (n, m)).astype(np.float32) / 4
    ids = np.stack([rng.permutation(1000)[:m] for _ in range(n)]).astype(np.int64)
    ids[rng.random((n, m)) < 0.1] = -1
    scores[rng.random((n, m)) < 0.05] = -np.inf
    ids[:20, 10:] = -1                                   # rows with fewer than k valid entries
    s, i, c = coarse.topk_rows(scores, ids, k, ordered=True, return_cols=True)
    for r in range(n):
        valid = [(-float(scores[r, j]), int(ids[r, j]), j) for j in range(m)
                 if ids[r, j] >= 0 and np.isfinite(scores[r, j])]
        want = sorted(valid)[:k]
        got = [(-float(s[r, t]), int(i[r, t]), int(c[r, t])) for t in range(k) if i[r, t] >= 0]
        assert got == want
        assert (i[r, len(want):] == -1).all() and np.isneginf(s[r, len(want):]).all()
        assert (c[r, len(want):] == -1).all()
    # unordered: the same sets
    s2, i2 = coarse.topk_rows(scores, ids, k)
    assert all(set(a) == set(b) for a, b in zip(i2, i))


@pytest.mark.parametrize("key", ["IVF32,PQ16x4", "IVF32,PQ32x4fs", "OPQ8_64,IVF32,PQ8x4"])
def test_one_assignment_serves_every_shard(data, key):
    """The IVF cells are found once per chunk and each shard only scans its lists: the same
    results as each shard's own search, for 8-bit-layout, fast-scan and OPQ-transformed indexes,
    in one thread or in slices over two."""
    g_coarse, _, q_coarse, _, _ = data
    ids = gallery_ids()
    trained = faiss.index_factory(128, key, faiss.METRIC_INNER_PRODUCT)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        trained.train(g_coarse[:4000])
    finally:
        faiss.omp_set_num_threads(threads)
    shards = []
    for a, b in ((0, 2500), (2500, N)):
        sh = faiss.clone_index(trained)
        sh.add_with_ids(g_coarse[a:b], ids[a:b])
        faiss.extract_index_ivf(sh).nprobe = 6
        shards.append(sh)
    a = coarse.assign(shards[0], q_coarse)                    # made on shard 0, used for both
    # xt: the queries as the IVF level sees them (OPQ8_64 rotates and reduces them to 64-d)
    assert a.cells.shape == a.cell_scores.shape == (NQ, 6) and a.queries.shape == (NQ, faiss.extract_index_ivf(trained).d)
    for sh in shards:
        ref_s, ref_i = coarse.search_shard(sh, q_coarse, 40)
        for threads in (1, 2):
            got_s, got_i = coarse.search_shard(sh, None, 40, assignment=a, threads=threads)
            np.testing.assert_allclose(got_s, ref_s, atol=1e-5)
            # same scores; equal-score entries may come in another order
            for r in range(NQ):
                assert set(got_i[r][got_s[r] > got_s[r, -1]]) == set(ref_i[r][ref_s[r] > ref_s[r, -1]])
    with pytest.raises(ValueError, match="nprobe"):
        faiss.extract_index_ivf(shards[1]).nprobe = 3
        coarse.search_shard(shards[1], None, 40, assignment=a)


def test_assignment_cache_computes_once_per_chunk():
    coarse.clear_cache()
    calls = []

    def make(tag):
        def compute():
            calls.append(tag)
            z = np.zeros((4, 2), np.float32)
            return coarse.Assignment(z, z, z.astype(np.int64))
        return compute

    for tag in ("c0", "c0", "c1", "c0"):
        coarse.cached_assignment(("idx", tag), make(tag))
    assert calls == ["c0", "c1"]
    coarse.clear_cache()
    coarse.cached_assignment(("idx", "c0"), make("c0"))
    assert calls == ["c0", "c1", "c0"]
    coarse.clear_cache()


def test_shard_shortlist_rule():
    """K' (each shard's list): S for one shard or when configured >= S; otherwise the smallest K'
    whose binomial overflow chance over all shards is <= 1e-4."""
    assert coarse.shard_shortlist(200, 1) == 200
    assert coarse.shard_shortlist(200, 2, configured=500) == 200      # never more than S
    assert coarse.shard_shortlist(200, 2, configured=150) == 150
    assert coarse.shard_shortlist(200, 2) == 127
    assert coarse.shard_shortlist(1050, 20) == 86
    for S, n in ((100, 2), (200, 3), (500, 8), (1050, 20), (2000, 100)):
        k = coarse.shard_shortlist(S, n)
        sf = coarse._binomial_sf(S, 1.0 / n)
        assert S / n <= k < S and n * sf[k] <= coarse.SHARD_SHORTLIST_EPS < n * sf[k - 1]
    # the binomial tail is right: P(X > mean) ~ 1/2, P(X > S) = 0
    sf = coarse._binomial_sf(200, 0.5)
    assert abs(sf[100] - 0.472) < 0.01 and sf[200] == 0.0


def test_merge_threshold_and_padding():
    s = np.array([[0.9, 0.5, 0.1], [0.2, 0.1, 0.0]], np.float32)
    i = np.array([[5, 6, 7], [8, 9, -1]], np.int64)
    got_s, got_i = coarse.merge_shortlists([(s, i)], 4, threshold=0.3)
    assert sorted(got_i[0][got_i[0] >= 0].tolist()) == [5, 6]
    assert (got_i[1] == -1).all() and np.isneginf(got_s[1]).all()   # nothing passed: no shortlist
    # ties at the cut are resolved by the smaller id, whatever the input order
    s = np.array([[0.5, 0.7, 0.5, 0.5]], np.float32)
    for perm in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        i = np.array([[30, 10, 20, 40]], np.int64)[:, perm]
        ts, ti = coarse.topk_rows(s[:, perm], i, 2, ordered=True)
        assert ti.tolist() == [[10, 20]] and ts.tolist() == [[pytest.approx(0.7), 0.5]]


def test_rerank_equals_brute_force_on_shortlist(data, gallery_output):
    _, g_fine, _, q_fine, _ = data
    ids = gallery_ids()
    rng = np.random.default_rng(0)
    S, k = 40, 10
    pos = np.stack([rng.choice(N, S, replace=False) for _ in range(NQ)])
    short = ids[pos]
    short[:5, 30:] = -1                            # some short lists
    short[5] = -1                                  # a query with no candidates at all
    coarse_s = rng.random(short.shape).astype(np.float32)
    # the stored (int8) gallery vectors, as the rerank must see them
    stored = fine_matrix(read_features(gallery_output, ["fine", "fine_scale"]))
    top_s, top_i, top_c = rerank.rerank(q_fine, short, coarse_s, feature_urls(gallery_output), k)
    brute = np.einsum("qd,qsd->qs", q_fine, stored[pos])
    brute[short < 0] = -np.inf
    for r in range(NQ):
        order = np.lexsort((short[r], -brute[r]))[:k]
        valid = np.isfinite(brute[r][order])
        np.testing.assert_array_equal(top_i[r][:valid.sum()], short[r][order][valid])
        np.testing.assert_allclose(top_s[r][:valid.sum()], brute[r][order][valid], atol=1e-5)
        assert (top_i[r][valid.sum():] == -1).all()
        # coarse score travels with its candidate
        col = [list(short[r]).index(g) for g in top_i[r][:valid.sum()]]
        np.testing.assert_array_equal(top_c[r][:valid.sum()], coarse_s[r][col])
    assert (top_i[5] == -1).all()
    assert (np.diff(top_s[0]) <= 0).all()
    # threshold keeps only matches at or above it
    th_s, th_i, _ = rerank.rerank(q_fine, short, coarse_s, feature_urls(gallery_output), k,
                                  match_threshold=0.5)
    assert (th_s[th_i >= 0] >= 0.5).all()
    assert ((top_s >= 0.5) == (th_i >= 0)).all()


def test_rerank_refuses_a_changed_feature_file(data, gallery_output):
    _, _, _, q_fine, _ = data
    short = gallery_ids()[:10][None, :].repeat(2, axis=0)
    with pytest.raises(ValueError, match="rows but the index manifest says"):
        rerank.rerank(q_fine[:2], short, np.zeros(short.shape, np.float32), feature_urls(gallery_output),
                      5, expected_rows=[1234, None, None])


def test_chunk_task_maps_ids_to_image_ids_and_uris(tmp_path, data, gallery_output):
    g_coarse, g_fine, q_coarse, q_fine, source = data
    ids = gallery_ids()
    qurl = str(tmp_path / "qf")
    synthetic.write_feature_output(qurl, q_coarse, q_fine, num_files=2, storage="float32",
                                   role="query", id_prefix="q")
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(128))
    index.add_with_ids(g_coarse, ids)
    out = str(tmp_path / "out")
    job = SearchJob(output=out, index_url="unused", index_manifest={}, n_shards=1, nprobe=1, query_int8=False,
                    query_files=tuple(feature_urls(qurl, 2)), feature_files=tuple(feature_urls(gallery_output)),
                    feature_rows=(2000, 2000, 2000), shortlist=100, k=3)
    half = NQ // 2   # file 0 of the queries holds the matching half
    chunk = Chunk(chunk=7, file_no=0, start=10, stop=half)
    part = coarse.search_shard(index, q_coarse[10:half], 100)
    stats = chunk_task(job, chunk, [part])
    assert stats["file"] == "part-00007.parquet" and stats["queries"] == half - 10
    import pyarrow.parquet as pq

    t = pq.read_table(f"{out}/part-00007.parquet").to_pydict()
    assert stats["rows"] == len(t["query_id"]) == 3 * (half - 10)
    assert t["rank"][:3] == [1, 2, 3]
    assert t["query_id"][0] == "q0000000010" and t["query_uri"][0] == "synthetic://query/q0000000010"
    # each matching query's rank-1 is its source (small noise) and the URI is that image's
    first = [i for i, r in enumerate(t["rank"]) if r == 1]
    hits = sum(t["gallery_id"][i] == synthetic.image_id(int(source[10 + n])) for n, i in enumerate(first))
    assert hits / len(first) > 0.95
    for i in first[:20]:
        assert t["gallery_uri"][i] == f"synthetic://gallery/{t['gallery_id'][i]}"
    # scores are the stored-vector cosines of the named image
    stored = fine_matrix(read_features(gallery_output, ["fine", "fine_scale"]))
    row = int(t["gallery_id"][0][3:])
    assert t["score"][0] == pytest.approx(float(q_fine[10] @ stored[row]), abs=1e-5)


def test_shard_cache_loads_once_and_evicts():
    coarse.clear_cache()
    calls = []

    def loader(name):
        return lambda: calls.append(name) or name

    assert coarse.cached_shard(("a",), loader("a"), 2) == "a"
    assert coarse.cached_shard(("a",), loader("a"), 2) == "a"
    coarse.cached_shard(("b",), loader("b"), 2)
    coarse.cached_shard(("a",), loader("a"), 2)          # a is now the most recent
    coarse.cached_shard(("c",), loader("c"), 2)          # evicts b
    assert calls == ["a", "b", "c"]
    assert coarse.cache_keys() == [("a",), ("c",)]
    coarse.clear_cache()


def test_vector_cache_reads_only_needed_groups_once(gallery_output):
    from retrieval.schema import column_matrix
    from retrieval.search.vectors import VectorCache

    urls = feature_urls(gallery_output)
    url = urls[1]                                    # 2000 rows in groups of 256
    table = read_features(gallery_output, ["fine", "fine_scale"]).slice(2000, 2000)
    codes_all, scale_all = column_matrix(table.column("fine")), table.column("fine_scale").to_numpy()
    cache = VectorCache(1 << 30, threads=2)           # decodes in 2 parallel parts
    rows = np.array([1999, 3, 300, 4, 3])            # groups 0, 1, 7; any order, repeats
    codes, scale = cache.rows(url, rows, "v1")
    assert codes.dtype == np.int8
    np.testing.assert_array_equal(codes, codes_all[rows])
    np.testing.assert_array_equal(scale, scale_all[rows])
    assert cache.reads == 3 and cache.nbytes == (256 + 256 + 208) * (512 + 4)   # group 7 holds 208 rows
    # whole-file arrays: the candidates are read in place by row number (no gather copy)
    full, full_scale = cache.vectors(url, np.array([5, 1990]), "v1")    # groups 0 and 7: cached
    assert cache.reads == 3 and full.shape == (2000, 512) and full_scale.shape == (2000,)
    np.testing.assert_array_equal(full[[5, 1990, 300]], codes_all[[5, 1990, 300]])
    cache.rows(url, np.array([5]), "v2")             # another version of the file: not served stale
    assert cache.reads == 4
    # the budget drops least recently used files (whole), never the one being read
    small = VectorCache(3 * 256 * 516)               # room for three groups
    small.rows(urls[0], np.array([0, 300]), None)    # file 0: 2 groups
    small.rows(url, np.array([0, 300, 600]), None)   # file 1: 3 groups -> file 0 is dropped
    assert small.reads == 5 and small.nbytes == 3 * 256 * 516
    small.rows(url, np.array([600]), None)           # still cached
    assert small.reads == 5
    small.rows(urls[0], np.array([0]), None)         # read again
    assert small.reads == 6
    with pytest.raises(KeyError, match="beyond the 2000 rows"):
        cache.rows(url, np.array([2000]), "v1")
    with pytest.raises(KeyError, match="beyond the 2000 rows"):
        cache.vectors(url, np.array([-1]), "v1")


def pair_scores_int8(q, qidx, codes, local, scale, threads=0):
    """The kernel on pairs given as (query, row): each pair in its own column of the matrix."""
    from retrieval.search.kernels import pair_scores_int8_into

    n = len(qidx)
    out = np.full(len(q) * max(n, 1), np.nan, np.float32)
    pos = qidx * max(n, 1) + np.arange(n)
    pair_scores_int8_into(out, q, pos, max(n, 1), codes, local, scale, threads)
    return out[pos]


def test_group_pairs_is_a_stable_sort_by_file_and_block():
    from retrieval.search.kernels import group_pairs

    rng = np.random.default_rng(4)
    files = rng.integers(0, 5, 20000)
    rows = rng.integers(0, 50000, 20000)
    flat = idmap.encode_ids(files, rows)
    flat[rng.random(20000) < 0.2] = -1
    for shift, max_keys in ((10, 1 << 22), (10, 3)):                # (file, block), or file only
        pos, f, r = group_pairs(flat, shift, max_keys)
        valid = np.flatnonzero(flat >= 0)
        vf, vr = idmap.decode_ids(flat[valid])
        key = vf * 64 + (vr >> shift) if max_keys > 3 else vf
        want = valid[np.argsort(key, kind="stable")]
        np.testing.assert_array_equal(pos, want)
        np.testing.assert_array_equal(idmap.encode_ids(f, r), flat[pos])
    empty = group_pairs(np.full(10, -1, np.int64), 10)
    assert all(len(a) == 0 for a in empty)


def test_int8_kernel_equals_float_scoring():
    from retrieval.schema import dequantize_int8, quantize_int8

    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 512)).astype(np.float32)
    codes, scale = quantize_int8(x)
    q = rng.standard_normal((40, 512)).astype(np.float32)
    qidx = np.sort(rng.integers(0, 40, 3000))
    local = rng.integers(0, 500, 3000)
    got = pair_scores_int8(q, qidx, codes, local, scale, threads=2)
    want = np.einsum("ij,ij->i", q[qidx].astype(np.float64), dequantize_int8(codes, scale)[local].astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # the float path of the rerank (faiss gather-dot) agrees
    alt = rerank.pair_scores(q, qidx, codes.astype(np.float32), local) * scale[local]
    np.testing.assert_allclose(got, alt, rtol=1e-5, atol=1e-4)
    assert pair_scores_int8(q, qidx[:0], codes, local[:0], scale).shape == (0,)
    with pytest.raises(ValueError, match="codes"):
        pair_scores_int8(q, qidx, codes.astype(np.float32), local, scale)


def test_feature_files_store_vectors_uncompressed(gallery_output):
    """Vector columns raw (zstd saved ~8% and made reads 5x slower), the others zstd."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(feature_urls(gallery_output)[0]).metadata
    codecs = {md.row_group(0).column(i).path_in_schema.split(".")[0]: md.row_group(0).column(i).compression
              for i in range(md.num_columns)}
    assert codecs["fine"] == codecs["coarse"] == codecs["fine_scale"] == "UNCOMPRESSED"
    assert codecs["image_id"] == codecs["uri"] == "ZSTD"


def test_int8_storage_is_fixed_size_binary_and_old_lists_still_read(tmp_path):
    import pyarrow as pa

    from retrieval.schema import column_matrix, feature_schema, int8_to_arrow, quantize_int8, vectors_to_arrow

    assert feature_schema(storage="int8").field("fine").type == pa.binary(512)
    codes, _ = quantize_int8(np.random.default_rng(0).standard_normal((10, 512)))
    binary, listed = int8_to_arrow(codes), vectors_to_arrow(codes, pa.int8())
    np.testing.assert_array_equal(column_matrix(binary), codes)
    np.testing.assert_array_equal(column_matrix(listed), codes)                   # outputs of before
    np.testing.assert_array_equal(column_matrix(binary.slice(3, 4)), codes[3:7])   # offsets honoured
    chunked = pa.chunked_array([binary.slice(0, 4), binary.slice(4)])
    np.testing.assert_array_equal(column_matrix(chunked), codes)
    with pytest.raises(ValueError, match="null"):
        column_matrix(pa.array([None], pa.binary(512)))


def test_auto_shortlist_grows_with_the_gallery():
    from retrieval.search.job import resolve_shortlist

    assert coarse.auto_shortlist(30) == coarse.auto_shortlist(1_000_000) == 200
    assert coarse.auto_shortlist(10_000_000) == 1050
    sizes = [coarse.auto_shortlist(n) for n in (10**6, 3 * 10**6, 10**7, 2 * 10**7, 10**8, 10**9)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[1] < sizes[2] < sizes[3]
    assert sizes[-1] == sizes[-2] == coarse.AUTO_SHORTLIST_MAX == 2000      # capped beyond the measured range
    assert resolve_shortlist(0, {"ntotal": 10_000_000, "shards": []}) == 1050
    assert resolve_shortlist(0, {"shards": [{"ntotal": 600_000}, {"ntotal": 400_000}]}) == 200
    assert resolve_shortlist(300, {"ntotal": 10_000_000, "shards": []}) == 300


def test_output_mixing_old_list_and_new_binary_int8_shards_reads_whole(tmp_path):
    """A feature output extended after the storage change holds both forms: it still reads as one."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from retrieval import fsio
    from retrieval.schema import vectors_to_arrow

    g_coarse, g_fine = synthetic.gallery(40, SPEC)
    url = str(tmp_path / "features")
    synthetic.write_feature_output(url, g_coarse, g_fine, num_files=2, storage="int8")
    new = read_features(url)
    first = f"{url}/part-00000.parquet"                    # rewrite shard 0 the old way
    t = pq.read_table(first)
    old = t.set_column(t.column_names.index("fine"), pa.field("fine", pa.list_(pa.int8(), 512)),
                       vectors_to_arrow(np.frombuffer(t.column("fine").combine_chunks().buffers()[1], np.int8)
                                        .reshape(-1, 512), pa.int8()))
    pq.write_table(old, first)
    manifest = json.loads(open(f"{url}/_manifest.json").read())
    manifest["shards"][0]["sha256"] = fsio.sha256_file(first)
    open(f"{url}/_manifest.json", "w").write(json.dumps(manifest))
    mixed = read_features(url)
    assert mixed.schema.field("fine").type == pa.binary(512)
    np.testing.assert_array_equal(fine_matrix(mixed), fine_matrix(new))


def test_int8_kernel_compiles_without_a_writable_cache(monkeypatch):
    """A read-only install (no cache location): the kernel is compiled without a cache."""
    from retrieval.search import kernels

    calls = []
    real = kernels._compile

    def compile_(cache):
        calls.append(cache)
        if cache:
            raise RuntimeError("cannot cache function 'dots_int8': no locator available")
        return real(cache)

    monkeypatch.setattr(kernels, "_compile", compile_)
    monkeypatch.setattr(kernels, "_KERNELS", None)
    q = np.ones((1, 8), np.float32)
    got = pair_scores_int8(q, np.array([0]), np.full((2, 8), 2, np.int8), np.array([1]), np.full(2, 0.5, np.float32))
    assert calls == [True, False] and got.tolist() == [8.0]
    s, i, c = kernels.select_topk(np.array([[0.1, 0.9, 0.5]], np.float32), np.array([[4, 5, 6]]), 2)
    assert calls == [True, False] and i.tolist() == [[5, 6]] and c.tolist() == [[1, 2]]


def test_gallery_labels_equal_fetch_rows_and_are_read_once(gallery_output):
    """The result rows' image_id/uri come from the cache's row groups: the same values as a direct
    read of those rows (idmap.fetch_rows), in the order asked, each group read once per process."""
    from retrieval.search.tasks import gallery_labels
    from retrieval.search.vectors import VectorCache

    urls = feature_urls(gallery_output)
    job = SearchJob(output="", index_url="", index_manifest={}, query_files=(), query_int8=True,
                    feature_files=tuple(urls), feature_rows=(2000, 2000, 2000), n_shards=1, nprobe=1,
                    feature_versions=("a", "b", "c"))
    rng = np.random.default_rng(5)
    gids = gallery_ids()[rng.integers(0, N, 700)]             # duplicates and every file, any order
    cache = VectorCache(1 << 30)
    ids, uris = gallery_labels(job, gids, cache)
    want = idmap.fetch_rows(urls, gids, ["image_id", "uri"])
    assert ids.to_pylist() == want.column("image_id").to_pylist()
    assert uris.to_pylist() == want.column("uri").to_pylist()
    first = cache.label_reads
    assert 0 < first <= 3 * 8 and cache.reads == 0            # 2000 rows = 8 groups of 256 per file
    again, _ = gallery_labels(job, gids[::-1], cache)
    assert again.to_pylist() == ids.to_pylist()[::-1] and cache.label_reads == first
    empty_ids, empty_uris = gallery_labels(job, gids[:0], cache)
    assert len(empty_ids) == len(empty_uris) == 0
    with pytest.raises(KeyError, match="feature file #7"):
        gallery_labels(job, idmap.encode_ids(7, np.array([0])), cache)
