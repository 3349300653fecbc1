"""The index build on real Parquet feature outputs, real faiss, local engine and real Spark."""
from __future__ import annotations

import json
import os
import shutil

import retrieval.index  # noqa: F401  (before faiss)
import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from faiss.contrib.evaluation import check_ref_knn_with_draws

from retrieval import config, outputs

from tests import synthetic
from retrieval.cli import main
from retrieval.index import idmap, store
from retrieval.index.build import build_index
from retrieval.index.reader import FeatureInputError
from retrieval.schema import coarse_matrix

SPEC = synthetic.SyntheticSpec(n_clusters=60, seed=3)
N_A, N_B = 6000, 2000


def cfg(*sets: str):
    return config.load(sets=["index.vectors_per_shard=2000", "index.quality_queries=300", *sets])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("index_data")
    coarse, fine = synthetic.gallery(N_A + N_B, SPEC)
    a = synthetic.write_feature_output(str(root / "feat_a"), coarse[:N_A], fine[:N_A], num_files=3)
    b = synthetic.write_feature_output(str(root / "feat_b"), coarse[N_A:], fine[N_A:], num_files=2,
                                       start=N_A)
    assert a["model_version"] == b["model_version"]
    qc, _, src = synthetic.queries(N_A, 200, 0, SPEC)
    return {"root": root, "a": str(root / "feat_a"), "b": str(root / "feat_b"), "coarse": coarse,
            "xq": qc, "src": src}


@pytest.fixture(scope="module")
def built(data):
    out = str(data["root"] / "idx_local")
    return out, build_index([data["a"]], out, cfg(), engine=None)


def all_vectors(manifest) -> tuple[np.ndarray, np.ndarray]:
    """Every coarse vector of the index's feature files with its index id (read independently)."""
    xs, ids = [], []
    for f in manifest["feature_files"]:
        x = coarse_matrix(pq.read_table(f["url"], columns=["coarse"]))
        xs.append(x)
        ids.append(idmap.encode_ids(f["file_no"], np.arange(len(x))))
    return np.concatenate(xs), np.concatenate(ids)


def single_index(index_url, manifest) -> faiss.Index:
    """One index holding everything, with the SAME trained quantizer and codebooks."""
    index = faiss.read_index(os.path.join(index_url, "trained.index"))
    x, ids = all_vectors(manifest)
    index.add_with_ids(x, ids)
    store.set_nprobe(index, manifest["nprobe"])
    return index


def test_manifest_and_layout(built, data):
    out, m = built
    assert m["stage"] == "index" and m["metric"] == "inner_product" and m["dim"] == 128
    assert m["fine_dim"] == 512 and m["model_version"] == "synthetic-v1"
    # 2,000-vector shards over 128 lists (~16 per list): too few to fill fast-scan's 32-code
    # blocks, so the rule takes 8-bit PQ (test_default_fast_scan_... builds the fast-scan default)
    assert m["index_key"] == "IVF128,PQ16" and m["nlist"] == 128 and m["pq_bytes"] == 16
    assert len(m["shards"]) == 3 and m["ntotal"] == N_A == sum(s["ntotal"] for s in m["shards"])
    assert [f["file_no"] for f in m["feature_files"]] == [0, 1, 2]
    assert abs(m["train_sample_size"] - 40 * 128) < 250  # 40 per cell, drawn over all files
    assert store.feature_file_urls(m) == [f["url"] for f in m["feature_files"]]
    assert sorted(os.listdir(out)) == ["_identity.json", "_manifest.json", "_shards", "_trained.json",
                                       "shard-00000.fine.parquet", "shard-00000.index", "shard-00001.fine.parquet",
                                       "shard-00001.index", "shard-00002.fine.parquet", "shard-00002.index",
                                       "trained.index"]
    for s in m["shards"]:
        assert s["sha256"] == store.fsio.sha256_file(os.path.join(out, s["file"]))
        copy = s["fine_by_list"]          # the shard's fine vectors by IVF list (index.fine_by_list)
        assert copy["sha256"] == store.fsio.sha256_file(os.path.join(out, copy["file"]))
        assert copy["rows"] == s["ntotal"]
    # the trained part is stored once: a shard file is much smaller than shard + quantizer
    trained = os.path.getsize(os.path.join(out, "trained.index"))
    assert trained >= 128 * 128 * 4
    shard0 = os.path.getsize(os.path.join(out, "shard-00000.index"))
    assert shard0 < 2000 * (16 + 8) + 256 * 128 * 4 + 4096
    q = m["quality"]
    assert q["queries"] == 300 and 1 <= q["nprobe"] <= 128 and q["source_cell_recall"] >= 0.995
    assert set(m["skipped"]) >= {"nan_inf", "duplicates", "zero"} and m["skipped"]["nan_inf"] == 0
    assert set(m["timings"]) >= {"scan_s", "train_s", "shards_s", "total_s"}


def test_sharded_equals_single_index(built, data):
    out, m = built
    ref = single_index(out, m)
    d_ref, i_ref = ref.search(data["xq"], 50)
    d, i = store.search_shards(out, data["xq"], 50)
    check_ref_knn_with_draws(d_ref, i_ref, d, i)
    with pytest.warns(FutureWarning, match="store.search is deprecated.*search_shards"):
        d_old, i_old = store.search(out, data["xq"], 50)     # the name before 0.2, until 0.3
    assert np.array_equal(i_old, i) and np.array_equal(d_old, d)
    # and each loaded shard is a plain searchable faiss index returning gallery ids
    shard = store.load_shard(out, 1, m)
    assert shard.ntotal == m["shards"][1]["ntotal"]
    _, ids = shard.search(data["coarse"][2500:2501], 1)
    assert idmap.decode_ids(ids)[0][0, 0] in (0, 1, 2)


def test_recall_bound_on_clustered_vectors(built, data):
    """At the manifest's nprobe, against exact search over all gallery vectors."""
    out, m = built
    x, ids = all_vectors(m)
    rng = np.random.default_rng(1)
    pick = rng.choice(len(x), 300, replace=False)
    q = x[pick] + 0.5 * rng.standard_normal((300, 128)).astype(np.float32) / np.sqrt(128)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = ids[np.argsort(-(q @ x.T), axis=1)[:, :100]]
    _, approx = store.search_shards(out, q, 100)
    recall100 = np.mean([len(np.intersect1d(a, e)) / 100 for a, e in zip(approx, exact)])
    assert recall100 >= 0.85, recall100
    assert (approx == ids[pick][:, None]).any(axis=1).mean() >= 0.99  # the source is in the top 100
    # the manifest's build-time figure measures the same thing
    assert abs(m["quality"]["recall@100"] - recall100) < 0.05
    # synthetic copies (the benchmark's generator): the true source lands in the top 500
    _, top = store.search_shards(out, data["xq"], 500)
    assert (top == idmap.encode_ids(data["src"] // 2000, data["src"] % 2000)[:, None]).any(axis=1).mean() >= 0.99


def test_forced_factory_string_with_transform(data, tmp_path):
    """Any IVF factory string, here with an OPQ rotation: the shards share the trained transform."""
    out = str(tmp_path / "idx")
    m = build_index([data["a"]], out, cfg("index.index_key=OPQ8_64,IVF64,PQ8", "index.quality_queries=100"))
    assert m["index_key"] == "OPQ8_64,IVF64,PQ8" and m["nlist"] == 64 and len(m["shards"]) == 3
    shard = store.load_shard(out, 0, m)
    assert isinstance(shard, faiss.IndexPreTransform)
    check_ref_knn_with_draws(*single_index(out, m).search(data["xq"], 20), *store.search_shards(out, data["xq"], 20))


def test_default_fast_scan_codes_where_shards_fill_the_blocks(data, tmp_path):
    """A 6,000-vector shard over 128 lists (~47 per list): the default takes 4-bit fast-scan
    codes (16 bytes, the same budget), except for an on-disk merge (flat lists: 8-bit PQ)."""
    out = str(tmp_path / "idx")
    m = build_index([data["a"]], out, cfg("index.vectors_per_shard=6000", "index.quality_queries=100"))
    assert m["index_key"] == "IVF128,PQ32x4fs" and m["pq_bytes"] == 16 and len(m["shards"]) == 1
    check_ref_knn_with_draws(*single_index(out, m).search(data["xq"], 20), *store.search_shards(out, data["xq"], 20))
    merged = build_index([data["a"]], str(tmp_path / "merged"),
                         cfg("index.vectors_per_shard=6000", "index.quality_queries=100"), merge_ondisk=True)
    assert merged["index_key"] == "IVF128,PQ16" and store.load_merged(str(tmp_path / "merged")).ntotal == N_A


def test_forced_fast_scan_index_and_its_ondisk_merge_refusal(data, tmp_path):
    """A forced 4-bit fast-scan key (the default's code layout) shards like any other; its blocked
    inverted lists cannot be merged on disk, which is refused before any work."""
    out = str(tmp_path / "idx")
    m = build_index([data["a"]], out, cfg("index.index_key=IVF64,PQ16x4fs", "index.quality_queries=100"))
    assert m["index_key"] == "IVF64,PQ16x4fs" and len(m["shards"]) == 3
    check_ref_knn_with_draws(*single_index(out, m).search(data["xq"], 20), *store.search_shards(out, data["xq"], 20))
    with pytest.raises(ValueError, match="fast-scan"):
        build_index([data["a"]], str(tmp_path / "idx2"), cfg("index.index_key=IVF64,PQ16x4fs"), merge_ondisk=True)
    assert not os.path.exists(tmp_path / "idx2" / "_manifest.json")


def test_spark_build_is_identical(built, data, spark):
    out, m = built
    out_s = str(data["root"] / "idx_spark")
    ms = build_index([data["a"]], out_s, cfg(), engine=spark)
    assert ms["engine"] == "spark"
    assert ms["trained"]["sha256"] == m["trained"]["sha256"]
    assert [s["sha256"] for s in ms["shards"]] == [s["sha256"] for s in m["shards"]]
    assert ms["quality"]["by_nprobe"] == m["quality"]["by_nprobe"] and ms["nprobe"] == m["nprobe"]


def test_corrupted_shard_is_caught(built, data, tmp_path):
    import shutil

    out, m = built
    copy = str(tmp_path / "idx")
    shutil.copytree(out, copy)
    path = os.path.join(copy, "shard-00001.index")
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    with pytest.raises(store.IndexIntegrityError, match="shard-00001.index"):
        store.load_shard(copy, 1, m)
    with pytest.raises(store.IndexIntegrityError, match="shard-00001.index"):
        store.search_shards(copy, data["xq"], 10)
    store.load_shard(copy, 0, m)  # the others still load
    open(os.path.join(copy, "trained.index"), "wb").write(b"truncated")
    store._CACHE.clear()
    with pytest.raises(store.IndexIntegrityError, match="trained.index"):
        store.load_shard(copy, 0, m)
    os.remove(os.path.join(copy, "_manifest.json"))
    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        store.read_index_manifest(copy)


def test_model_version_mismatch_refused(built, data, tmp_path):
    out, _ = built
    x = data["coarse"][:1500]
    other = str(tmp_path / "feat_other")
    synthetic.write_feature_output(other, x, np.zeros((len(x), 512), np.float32) + 0.04, num_files=1,
                                   model_version="other-model")
    with pytest.raises(FeatureInputError, match="model_version"):
        build_index([data["a"], other], str(tmp_path / "idx"), cfg())
    with pytest.raises(FeatureInputError, match="other-model"):
        build_index([other], out, cfg(), append=True)
    assert store.read_index_manifest(out)["ntotal"] == N_A  # untouched


def test_append_equals_from_scratch_with_same_quantizer(built, data, tmp_path):
    import shutil

    out, m0 = built
    idx = str(tmp_path / "idx")
    shutil.copytree(out, idx)
    m = build_index([data["b"]], idx, cfg(), append=True)
    assert m["trained"] == m0["trained"] and m["ntotal"] == N_A + N_B
    assert [f["file_no"] for f in m["feature_files"]] == [0, 1, 2, 3, 4]
    assert [s["file"] for s in m["shards"]] == [f"shard-{i:05d}.index" for i in range(4)]
    assert m["shards"][:3] == m0["shards"][:3]  # old shards untouched
    assert [b["kind"] for b in m["builds"]] == ["build", "append"]
    ref = single_index(idx, m)
    xq = data["coarse"][N_A:N_A + 100] + 0.01
    check_ref_knn_with_draws(*ref.search(xq, 20), *store.search_shards(idx, xq, 20))
    # an item of the appended output is found under its new id: file 3 or 4
    _, top = store.search_shards(idx, data["coarse"][N_A + 1500:N_A + 1501], 1)
    assert idmap.decode_ids(top)[0][0, 0] == 4 and idmap.decode_ids(top)[1][0, 0] == 500
    with pytest.raises(FeatureInputError, match="already in the index"):
        build_index([data["b"]], idx, cfg(), append=True)


def test_resume_after_failed_shard(built, data, tmp_path, spark, monkeypatch):
    """A Spark task that fails mid-shard is retried: same bytes. A run that died (one shard file
    missing, one corrupted, a temp file left, no manifest) resumes: finished shards reused."""
    out, m0 = built
    idx = str(tmp_path / "idx")
    monkeypatch.setenv("RETRIEVAL_FAULTS", "stage=index,task=1,after_items=1000")
    m = build_index([data["a"]], idx, cfg(), engine=spark)
    monkeypatch.delenv("RETRIEVAL_FAULTS")
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in m0["shards"]]
    markers = [json.load(open(os.path.join(idx, "_shards", f"shard-{i:05d}.json"))) for i in range(3)]
    assert [mk["attempt"] for mk in markers] == [0, 1, 0]  # shard 1 failed once, then succeeded
    os.remove(os.path.join(idx, "_manifest.json"))
    os.remove(os.path.join(idx, "shard-00002.index"))
    with open(os.path.join(idx, "shard-00000.index"), "r+b") as fh:
        fh.seek(100)
        fh.write(b"garbage")
    open(os.path.join(idx, ".tmp-0123-shard-00001.index"), "wb").write(b"partial")
    m2 = build_index([data["a"]], idx, cfg(), engine=None)
    assert m2["builds"][-1]["shards_reused"] == 1  # shard 1; shard 0 (bad sha256) and 2 rebuilt
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m0["shards"]]
    assert not any(n.startswith(".tmp-") for n in os.listdir(idx))
    # complete and unchanged inputs: nothing to do; other inputs: refused; overwrite: rebuilt
    assert build_index([data["a"]], idx, cfg())["created"] == m2["created"]
    with pytest.raises(outputs.OutputExistsError, match=r"holds an index output \(input .*feat_a, this run's "
                                                        r"is .*feat_a, .*feat_b\); nothing was written: pass "
                                                        r"--overwrite to replace it, --append to add to it"):
        build_index([data["a"], data["b"]], idx, cfg())
    m3 = build_index([data["b"]], idx, cfg("index.mode=overwrite"))
    assert m3["ntotal"] == N_B and len(m3["shards"]) == 1 and not os.path.exists(
        os.path.join(idx, "shard-00002.index"))


def test_bad_vectors_and_duplicates(data, tmp_path):
    x = data["coarse"][:3000].copy()
    x[5] = np.nan
    x[17, 3] = np.inf
    x[40] = 0.0
    x[41] *= 3.0  # not normalised: indexed after normalisation
    fine = np.full((len(x), 512), 0.04, np.float32)
    feat = str(tmp_path / "feat")
    synthetic.write_feature_output(feat, x, fine, num_files=2)
    dup = str(tmp_path / "dup")  # rows 100-599 again, same image_ids
    synthetic.write_feature_output(dup, x[100:600], fine[100:600], num_files=1, start=100)
    m = build_index([feat, dup], str(tmp_path / "idx"), cfg())
    sk = m["skipped"]
    assert (sk["nan_inf"], sk["zero"], sk["duplicates"], sk["renormalised"]) == (2, 1, 500, 1)
    assert m["ntotal"] == 3000 - 3
    reasons = {(e["reason"], e.get("image_id")) for e in sk["examples"]}
    assert ("nan_inf", "img0000000005") in reasons and ("zero", "img0000000040") in reasons
    assert any(e["reason"] == "duplicate" and e["kept"][0] in (0, 1) and e["duplicates"][0][0] == 2
               for e in sk["examples"])
    _, top = store.search_shards(str(tmp_path / "idx"), x[[41, 300]] / np.linalg.norm(x[[41, 300]], axis=1,
                                                                                  keepdims=True), 1)
    assert idmap.decode_ids(top)[0][:, 0].tolist() == [0, 0]  # the first occurrence, not file 2
    with pytest.raises(FeatureInputError, match="duplicate image_id"):
        build_index([feat, dup], str(tmp_path / "idx2"), cfg("index.duplicates=error"))
    keep = build_index([feat, dup], str(tmp_path / "idx3"), cfg("index.duplicates=keep"))
    assert keep["ntotal"] == 3000 - 3 + 500 and keep["skipped"]["duplicates_found"] == 500


def test_duplicate_detection_agrees_across_methods(data, tmp_path, spark):
    """Driver-side id hashes, the Spark shuffle and the pyarrow group-by find the same duplicates."""
    from retrieval.index import dedup
    from retrieval.index.reader import list_feature_files

    x = data["coarse"][:1000]
    fine = np.full((len(x), 512), 0.04, np.float32)
    synthetic.write_feature_output(str(tmp_path / "f1"), x, fine, num_files=2)            # ids 0-999
    synthetic.write_feature_output(str(tmp_path / "f2"), x[:300], fine[:300], num_files=1, start=700)  # 700-999 again
    synthetic.write_feature_output(str(tmp_path / "f3"), x[:50], fine[:50], num_files=1, start=980)    # 980-1029
    files = list_feature_files([str(tmp_path / n) for n in ("f1", "f2", "f3")])
    for first_new in (0, 2, 3):
        a = dedup.find_from_hashes(files, {f.file_no: dedup.file_hashes(f) for f in files}, first_new)
        b = dedup.find(spark, files, first_new)
        c = dedup.find(None, files, first_new)
        for d in (b, c):
            assert d.count == a.count and d.examples == a.examples
            assert {k: v.tolist() for k, v in d.skip.items()} == {k: v.tolist() for k, v in a.skip.items()}
    assert a.count == 20 and a.skip[3].tolist() == list(range(20))  # ids 980-999 of f3 (first_new=3)
    full = dedup.find(None, files, 0)
    assert full.count == 300 + 20 and full.skip[2].tolist() == list(range(300))


def test_bad_inputs_clear_errors(data, tmp_path):
    x = data["coarse"][:1200]
    fine = np.full((len(x), 512), 0.04, np.float32)
    narrow = str(tmp_path / "narrow")
    synthetic.write_feature_output(narrow, x[:, :64].copy(), fine, num_files=1)
    with pytest.raises(FeatureInputError, match="64 dimensions"):
        build_index([narrow], str(tmp_path / "i1"), cfg())
    empty = str(tmp_path / "empty")
    synthetic.write_feature_output(empty, x[:0], fine[:0], num_files=1)
    with pytest.raises(FeatureInputError, match="no vectors"):
        build_index([empty], str(tmp_path / "i2"), cfg())
    trunc = str(tmp_path / "trunc")
    synthetic.write_feature_output(trunc, x, fine, num_files=2)
    part = os.path.join(trunc, "part-00001.parquet")
    open(part, "r+b").truncate(os.path.getsize(part) // 2)
    with pytest.raises(FeatureInputError, match="part-00001.parquet.*sha256"):
        build_index([trunc], str(tmp_path / "i3"), cfg())
    os.remove(os.path.join(trunc, "_manifest.json"))
    with pytest.raises(FeatureInputError, match="_manifest.json"):
        build_index([trunc], str(tmp_path / "i4"), cfg())
    queries = str(tmp_path / "queries")
    synthetic.write_feature_output(queries, x, fine, num_files=1, role="query")
    with pytest.raises(FeatureInputError, match="gallery"):
        build_index([queries], str(tmp_path / "i5"), cfg())
    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        build_index([data["a"]], str(tmp_path / "i6"), cfg(), append=True)


def test_merge_ondisk_and_cli(data, tmp_path, capsys):
    out = str(tmp_path / "idx")
    rc = main(["index", "--features", data["a"], "--output", out, "--engine", "local", "--merge-ondisk",
               "--set", "index.vectors_per_shard=2000", "--set", "index.quality_queries=100"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ntotal"] == N_A and summary["shards"] == 3 and summary["merged"] is True
    m = store.read_index_manifest(out)
    merged = store.load_merged(out, m)
    assert merged.ntotal == N_A
    check_ref_knn_with_draws(*store.search_shards(out, data["xq"], 30), *merged.search(data["xq"], 30))
    rc = main(["index", "--features", str(tmp_path / "missing"), "--output", str(tmp_path / "x"),
               "--engine", "local"])
    assert rc == 2 and "_manifest.json" in capsys.readouterr().err


def test_an_index_with_the_old_marker_name_is_read_then_renamed(built, data, tmp_path):
    """Indexes built before 0.2 named the marker manifest.json: read (search, append, rerun) until
    the next build writes _manifest.json (retrieval/outputs.py)."""
    src, m = built
    idx = str(tmp_path / "old")
    shutil.copytree(src, idx)
    os.rename(os.path.join(idx, "_manifest.json"), os.path.join(idx, "manifest.json"))
    assert store.read_index_manifest(idx) == m
    again = build_index([data["a"]], idx, cfg(), engine=None)      # complete, same inputs: nothing to do
    assert again == m
    assert "_manifest.json" in os.listdir(idx) and "manifest.json" not in os.listdir(idx)
    assert json.load(open(os.path.join(idx, "_manifest.json"))) == m
