"""The shard's id -> IVF list lookup of the list-ordered fine copy (retrieval/index/finecopy.py):
the dense O(1) lookup gives the binary search's lists, refuses ids the shard does not hold, and
falls back to the binary search when the shard's rows are sparse in their files."""
import faiss
import numpy as np
import pytest

from retrieval.index import finecopy, idmap


def _ivf(ids: np.ndarray, nlist: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(ids), 8)).astype(np.float32)
    q = faiss.IndexFlatL2(8)
    index = faiss.IndexIVFFlat(q, 8, nlist)
    index.train(x)
    index.add_with_ids(x, ids)
    return index, q


def test_dense_lookup_equals_the_binary_search_and_refuses_unknown_ids():
    # two files, a run of rows each, with holes (rows skipped at build time)
    rows_a = np.setdiff1d(np.arange(100, 700), [150, 151, 400])
    rows_b = np.arange(0, 300)
    ids = np.concatenate([idmap.encode_ids(3, rows_a), idmap.encode_ids(5, rows_b)])
    index, _q = _ivf(ids)
    table = finecopy.list_table(index)
    assert np.array_equal(table[0], np.sort(ids))
    lookup = finecopy.ListLookup(table)
    assert lookup.dense is not None
    pick = np.random.default_rng(1).choice(ids, size=(40, 25))
    pick[0, :3] = -1
    got = lookup(pick)
    assert np.array_equal(got, finecopy.lists_of(table, pick))
    assert (got[0, :3] == -1).all() and (got[pick >= 0] >= 0).all()
    # each id's list is the one faiss put it in
    for lst in range(index.nlist):
        n = index.invlists.list_size(lst)
        if n:
            lids = faiss.rev_swig_ptr(index.invlists.get_ids(lst), n).copy()
            assert (lookup(lids) == lst).all()
    for absent in (idmap.encode_ids(3, np.array([150])), idmap.encode_ids(3, np.array([99])),
                   idmap.encode_ids(4, np.array([0])), idmap.encode_ids(9, np.array([0]))):
        with pytest.raises(KeyError):
            lookup(absent)


def test_sparse_rows_fall_back_to_the_binary_search():
    ids = idmap.encode_ids(0, np.arange(0, 2_000_000, 1000))      # 2,000 rows spread over 2M
    index, _q = _ivf(ids)
    table = finecopy.list_table(index)
    lookup = finecopy.ListLookup(table)
    assert lookup.dense is None
    pick = ids[::7]
    assert np.array_equal(lookup(pick), finecopy.lists_of(table, pick))
    with pytest.raises(KeyError):
        lookup(idmap.encode_ids(0, np.array([5])))
