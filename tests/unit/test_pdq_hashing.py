"""PDQ hash forms and the binary index (retrieval/hashing.py, retrieval/index/pdq.py): hex round trips
in the reference's bit order, Hamming distances, and the multi-hash range search against brute force."""
from __future__ import annotations

import faiss
import numpy as np
import pdqhash
import pytest

from retrieval import hashing
from retrieval.index import pdq as pdq_index


def test_hex_is_the_reference_bit_order_and_round_trips():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
    vector, quality = pdqhash.compute(rgb)
    h, q, dihedral = hashing.pdq_of_rgb(rgb)
    # the 64-hex-digit form of ThreatExchange's pdq hasher: the bit vector read as one binary number
    assert hashing.to_hex(h) == "%064x" % int("".join(map(str, vector)), 2) and q == quality
    assert hashing.from_hex(hashing.to_hex(h).upper()) == h and len(dihedral) == 7 * 32
    for bad in ("", "12", "g" * 64, "0" * 63, "0" * 65):
        with pytest.raises(ValueError, match="not a PDQ hash"):
            hashing.from_hex(bad)


def test_hamming_and_similarity_agree_with_faiss():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, (5, 32), dtype=np.uint8), rng.integers(0, 256, (7, 32), dtype=np.uint8)
    flat = faiss.IndexBinaryFlat(256)
    flat.add(b)
    dist, ids = flat.search(a, 7)
    mine = hashing.hamming(a, b)
    assert (np.take_along_axis(mine, ids, 1) == dist).all()
    assert hashing.similarity(np.array([0, 31, 128, 256])).tolist() == pytest.approx([1.0, 0.7578125, 0.0, -1.0])


@pytest.mark.parametrize("max_distance", [0, 15, 31, 40])
def test_multihash_range_search_equals_brute_force(max_distance):
    """Exact by the pigeonhole argument of the module doc: the same pairs as a full scan, on
    hashes planted within 0..max_distance+8 bits of gallery hashes (so some fall outside)."""
    rng = np.random.default_rng(max_distance)
    gallery = rng.integers(0, 256, (3000, 32), dtype=np.uint8)
    index = pdq_index.multihash(gallery)
    bits = np.unpackbits(gallery[rng.integers(0, len(gallery), 300)], axis=1)
    for row, k in zip(bits, rng.integers(0, max_distance + 9, len(bits))):
        row[rng.choice(256, int(k), replace=False)] ^= 1
    queries = np.packbits(bits, axis=1)
    lims, dist, ids = pdq_index.range_search(index, queries, max_distance)
    brute = hashing.hamming(queries, gallery)
    for i in range(len(queries)):
        got = dict(zip(ids[lims[i]:lims[i + 1]].tolist(), dist[lims[i]:lims[i + 1]].tolist()))
        want = {int(j): int(brute[i, j]) for j in np.nonzero(brute[i] <= max_distance)[0]}
        assert got == want, i
    assert lims[-1] > 0
    recall = pdq_index.measured_recall(index, gallery, max_distance, n=200)
    assert recall["recall_vs_brute_force"] == 1.0 and recall["queries"] == 200
    # nflip=0 (the fast default) finds a subset, with its true distances, and most of the pairs
    lims0, dist0, ids0 = pdq_index.range_search(index, queries, max_distance, nflip=0)
    for i in range(len(queries)):
        for j, d in zip(ids0[lims0[i]:lims0[i + 1]], dist0[lims0[i]:lims0[i + 1]]):
            assert brute[i, j] == d <= max_distance
    assert lims0[-1] >= 0.9 * lims[-1]


def test_the_plan_has_a_pdq_line_only_with_extract_pdq():
    from retrieval import config
    from retrieval.plan import Cluster, plan

    off = plan(1_000_000_000, Cluster(), cfg=config.load())
    on = plan(1_000_000_000, Cluster(), cfg=config.load(sets=["extract.pdq=true"]))
    assert "pdq" not in off["stages"]
    line = on["stages"]["pdq"]
    assert line["storage"] == pytest.approx(8e9 * pdq_index.PLAN_RATES["pdq_index_bytes_per_hash"])
    # sharded: 500 shards of 2M images, a task per shard and per (list chunk, shard): fits a core's memory
    assert "500 shards of 2,000,000 images" in line["basis"] and line["tasks"] == 10 * 500
    assert line["memory_per_task"] == pytest.approx(1.2 * 16e6 * pdq_index.PLAN_RATES["pdq_index_bytes_per_hash"])
    assert not any(w.startswith("pdq:") for w in on["warnings"])


def test_a_hash_list_is_read_as_text(tmp_path):
    """Partner ids with leading zeros keep them, and a hash of digits only is a hash, not a number."""
    from retrieval.pdq.job import read_hash_list

    digits = "1234567890" * 6 + "1234"
    hexed = "ab" * 32
    path = tmp_path / "list.csv"
    path.write_text(f"\ufeffHash,image_id,quality\n{digits},00042,90\n{hexed},7,\nnot-a-hash,0008,50\n")
    rows, errors, low = read_hash_list(str(path), 60)
    assert rows.column("image_id").to_pylist() == ["00042", "7"]
    assert [h.hex() for h in rows.column("hash").to_pylist()] == [digits, hexed]
    assert rows.column("quality").to_pylist() == [90, None] and low == 0
    assert errors.column("image_id").to_pylist() == ["0008"] and errors.num_rows == 1
