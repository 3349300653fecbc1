"""PDQ hash lists end to end (issue 24 item 3): extract.pdq hashes equal the pdqhash reference
values of the fully decoded files; retrieval index builds the PDQ index beside the shards;
retrieval pdq export -> match round-trips; local and Spark engines agree."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pdqhash
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from retrieval import cli, config, fsio, hashing
from retrieval.extract.job import extract, read_features
from retrieval.index.build import build_index
from retrieval.index.store import read_index_manifest
from retrieval.pdq.job import export, match
from retrieval.sample import real_photos
from retrieval.search.results import read_results

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_GALLERY = 8


def cfg(**sets):
    items = [f"{k}={v}" for k, v in {"extract.num_shards": 2, "extract.batch_size": 4, "extract.pdq": "true",
                                      "extract.progress_seconds": 0.5, "index.progress_seconds": 0.5,
                                      "index.quality_queries": 0, "index.tune_queries": 0, **sets}.items()]
    return config.load(sets=items)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A gallery of real photos (large JPEGs: the model's input is draft-decoded, the hash's is not,
    and PNGs) and queries: a re-encoded copy, a rotated copy, a mirrored copy and an unrelated photo."""
    root = tmp_path_factory.mktemp("pdq")
    gallery, queries = root / "gallery", root / "queries"
    gallery.mkdir()
    queries.mkdir()
    paths = real_photos("all")[:N_GALLERY + 1]
    for i, path in enumerate(paths[:N_GALLERY]):
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        img = img.resize((img.width * 2, img.height * 2)) if max(img.size) < 800 else img
        img.save(gallery / (f"g{i}.jpg" if i % 2 == 0 else f"g{i}.png"), **({"quality": 92} if i % 2 == 0 else {}))
    g0 = Image.open(gallery / "g0.jpg").convert("RGB")
    g0.save(queries / "reencoded.jpg", quality=60)
    g0.transpose(Image.ROTATE_90).save(queries / "rotated.png")
    Image.open(gallery / "g1.png").convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(queries / "mirrored.png")
    ImageOps.exif_transpose(Image.open(paths[N_GALLERY])).convert("RGB").save(queries / "unrelated.png")
    return {"gallery": str(gallery), "queries": str(queries), "root": root}


@pytest.fixture(scope="module")
def built(photos):
    root = photos["root"]
    feats, index = str(root / "feats"), str(root / "index")
    extract(photos["gallery"], feats, cfg())
    manifest = build_index(feats, index, cfg(), None)
    return {"features": feats, "index": index, "manifest": manifest}


def _reference(path: str) -> tuple[str, int]:
    """pdqhash on the FULL decoded file (PIL, EXIF orientation, RGB), as hex."""
    rgb = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"), dtype=np.uint8)
    vector, quality = pdqhash.compute(rgb)
    return "%064x" % int("".join(map(str, vector)), 2), quality


def test_extracted_hashes_are_the_pdqhash_reference_values(photos, built):
    table = read_features(built["features"])
    assert table.num_rows == N_GALLERY
    assert table.schema.field("pdq").type.byte_width == 32 and table.schema.field("pdq_dihedral").type.byte_width == 224
    for image_id, h, q, dihedral in zip(*(table.column(c).to_pylist() for c in
                                          ("image_id", "pdq", "pdq_quality", "pdq_dihedral"))):
        ref_hex, ref_q = _reference(os.path.join(photos["gallery"], image_id))
        assert hashing.to_hex(h) == ref_hex and q == ref_q, image_id
        # the dihedral variants are pdqhash's own, in its order
        rgb = np.asarray(Image.open(os.path.join(photos["gallery"], image_id)).convert("RGB"), dtype=np.uint8)
        vectors, _ = pdqhash.compute_dihedral(rgb)
        assert dihedral == b"".join(np.packbits(v.astype(np.uint8)).tobytes() for v in vectors[1:])
    # the hash of the model's draft-decoded input would differ: the full decode matters on large JPEGs
    big = os.path.join(photos["gallery"], "g0.jpg")
    img = Image.open(big)
    img.draft("RGB", (224, 224))
    draft_vec, _ = pdqhash.compute(np.asarray(img.convert("RGB"), dtype=np.uint8))
    assert "%064x" % int("".join(map(str, draft_vec)), 2) != _reference(big)[0]


def test_without_the_setting_there_are_no_hash_columns_and_no_pdq_index(photos, tmp_path):
    feats = str(tmp_path / "f")
    m = extract(photos["gallery"], feats, cfg(**{"extract.pdq": "false", "extract.num_shards": 1}))
    assert m["pdq"] is False and "pdq" not in read_features(feats).column_names
    manifest = build_index(feats, str(tmp_path / "i"), cfg(), None)
    assert "pdq" not in manifest
    with pytest.raises(ValueError, match="no PDQ hash index.*extract.pdq=true"):
        match(str(tmp_path / "none.csv"), str(tmp_path / "i"), str(tmp_path / "m"), cfg())


def test_the_index_holds_the_pdq_hashes_exact_against_brute_force(built):
    block = read_index_manifest(built["index"])["pdq"]
    assert block["count"] == N_GALLERY and block["dihedral"] == 7 * N_GALLERY
    exact, fast = block["quality"]["nflip=auto"], block["quality"]["nflip=0"]
    assert exact["recall_vs_brute_force"] == 1.0 and exact["pairs_brute_force"] > 0
    assert fast["pairs_brute_force"] == exact["pairs_brute_force"] and fast["recall_vs_brute_force"] >= 0.9
    for f in block["files"]:
        assert fsio.sha256_file(fsio.join(built["index"], f["file"])) == f["sha256"]


def test_export_match_round_trip_finds_the_same_images(built, tmp_path):
    listed = str(tmp_path / "gallery.csv")
    out = export(built["features"], listed, cfg())
    assert out["counts"] == {"images": N_GALLERY, "written": N_GALLERY, "low_quality": 0}
    with open(listed, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["hash", "image_id", "quality"] and all(len(r["hash"]) == 64 for r in rows)
    m = match(listed, built["index"], str(tmp_path / "m"), cfg())
    assert m["stage"] == "pdq" and m["counts"]["queries"] == N_GALLERY and m["counts"]["errors"] == 0
    res = read_results(str(tmp_path / "m"))
    top = {r["query_id"]: r for r in res.to_pylist() if r["rank"] == 1}
    assert set(top) == {r["image_id"] for r in rows}
    for qid, r in top.items():
        assert r["gallery_id"] == qid and r["distance"] == 0 and r["score"] == 1.0 and r["signal"] == "pdq"
    assert all(0 <= d <= 31 for d in res.column("distance").to_pylist())
    # the report reads the match output as it reads a search output, and says what the score is
    assert cli.main(["report", "--results", str(tmp_path / "m"), "--output", str(tmp_path / "r"),
                     "--engine", "local"]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert "PDQ distance 0 bits" in html and "PDQ hash matches" in html and "coarse 1.000" not in html
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["thresholds"]["source"] == "pdq" and summary["counts"]["flagged_queries"] == N_GALLERY
    # and evaluate: every listed image's rank-1 match is itself
    truth = tmp_path / "truth.csv"
    truth.write_text("query_id,gallery_id\n" + "".join(f"{r['image_id']},{r['image_id']}\n" for r in rows))
    assert cli.main(["evaluate", "--results", str(tmp_path / "m"), "--truth", str(truth), "--engine", "local"]) == 0
    assert json.loads((tmp_path / "m.eval" / "metrics.json").read_text())["recall@1"] == 1.0


def test_match_leaves_removed_images_out_on_both_engines(built, spark, tmp_path):
    """retrieval remove leaves the PDQ index as it is (a build keeps listed ids' hashes too): the
    match drops the rows of ids on the index's takedown list, before its top_k."""
    import shutil

    from retrieval.remove.job import remove

    listed = str(tmp_path / "gallery.csv")
    export(built["features"], listed, cfg())
    with open(listed, newline="") as fh:
        ids = [r["image_id"] for r in csv.DictReader(fh)]
    index = str(tmp_path / "index")
    shutil.copytree(built["index"], index)
    (tmp_path / "gone.txt").write_text(ids[0] + "\n")
    remove(index, str(tmp_path / "gone.txt"), cfg())
    for name, engine in (("local", None), ("spark", spark)):
        match(listed, index, str(tmp_path / name), cfg(**{"pdq.max_distance": 64, "pdq.top_k": 3}), engine)
        res = read_results(str(tmp_path / name)).to_pylist()
        assert ids[0] not in {r["gallery_id"] for r in res}
        per_query = {q: [r["gallery_id"] for r in res if r["query_id"] == q] for q in ids}
        assert ids[0] not in per_query[ids[0]]                         # its own hash matches nothing now
        assert all(per_query[q][0] == q for q in ids[1:])
    assert read_results(str(tmp_path / "local")).equals(read_results(str(tmp_path / "spark")))


def _query_list(photos, tmp_path) -> str:
    feats = str(tmp_path / "qf")
    extract(photos["queries"], feats, cfg(**{"extract.role": "query", "extract.num_shards": 1}))
    listed = str(tmp_path / "queries.csv")
    export(feats, listed, cfg())
    with open(listed, "a") as fh:                  # a partner's list has bad lines too
        fh.write("not-a-hash,broken,100\n")
    return listed


@pytest.mark.parametrize("engine", ["local", "spark"])
def test_match_finds_edited_copies_on_both_engines_and_dihedral_finds_rotations(photos, built, tmp_path, engine,
                                                                                request):
    spark = request.getfixturevalue("spark") if engine == "spark" else None
    listed = _query_list(photos, tmp_path)
    plain = match(listed, built["index"], str(tmp_path / "plain"), cfg(**{"pdq.chunk_rows": 2}), spark)
    both = match(listed, built["index"], str(tmp_path / "dihedral"),
                 cfg(**{"pdq.chunk_rows": 2, "pdq.dihedral": "true"}), spark)
    assert plain["engine"] == engine and len(plain["files"]) == 2    # 4 hashes, 2 per task
    assert plain["counts"]["errors"] == 1 and plain["counts"]["queries"] == 4
    errors = pq.read_table(os.path.join(str(tmp_path / "plain"), "errors", "part-00000.parquet")).to_pylist()
    assert errors[0]["image_id"] == "broken" and "not a PDQ hash" in errors[0]["error"]

    def top(url):
        return {r["query_id"]: (r["gallery_id"], r["distance"]) for r in read_results(url).to_pylist()
                if r["rank"] == 1}
    p, d = top(str(tmp_path / "plain")), top(str(tmp_path / "dihedral"))
    assert p["reencoded.jpg"][0] == "g0.jpg" and p["reencoded.jpg"][1] <= 31
    assert "rotated.png" not in p and "mirrored.png" not in p and "unrelated.png" not in p
    assert d["rotated.png"][0] == "g0.jpg" and d["mirrored.png"][0] == "g1.png" and "unrelated.png" not in d
    if engine == "spark":        # the same rows as the local engine
        local = match(listed, built["index"], str(tmp_path / "local"),
                      cfg(**{"pdq.chunk_rows": 2, "pdq.dihedral": "true"}))
        assert read_results(str(tmp_path / "local")).equals(read_results(str(tmp_path / "dihedral")))
        assert [f["sha256"] for f in local["files"]] == [f["sha256"] for f in both["files"]]


def test_cli_pdq_export_and_match_and_their_errors(built, tmp_path, capsys):
    listed = str(tmp_path / "l.csv")
    assert cli.main(["pdq", "export", "--features", built["features"], "--output", listed, "--engine", "local",
                     "--set", "extract.pdq=true"]) == 0
    assert cli.main(["pdq", "export", "--features", built["features"], "--output", listed, "--engine", "local",
                     "--set", "pdq.min_quality=50"]) == 2   # the file holds another list: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["pdq", "match", "--hash-list", listed, "--output", str(tmp_path / "m"),
                     "--engine", "local"]) == 2
    assert "needs --index" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("checksum,name\nabc,x\n")
    assert cli.main(["pdq", "match", "--hash-list", str(bad), "--index", built["index"], "--output",
                     str(tmp_path / "m2"), "--engine", "local"]) == 2
    assert "needs the columns hash and image_id" in capsys.readouterr().err
    assert cli.main(["pdq", "match", "--hash-list", listed, "--index", built["index"], "--output",
                     str(tmp_path / "m3"), "--engine", "local", "--set", "pdq.max_distance=0"]) == 0
    res = read_results(str(tmp_path / "m3"))
    assert set(res.column("distance").to_pylist()) == {0}


def test_spark_extracts_and_indexes_the_same_hashes(spark, photos, built, tmp_path):
    feats, index = str(tmp_path / "feats"), str(tmp_path / "index")
    m = extract(photos["gallery"], feats, cfg(), spark)
    assert m["engine"] == "spark" and m["pdq"] is True
    cols = ["image_id", "pdq", "pdq_quality", "pdq_dihedral"]
    assert read_features(feats, columns=cols).equals(read_features(built["features"], columns=cols))
    spark_block = build_index(feats, index, cfg(), spark)["pdq"]
    local_block = read_index_manifest(built["index"])["pdq"]
    # the same hashes and binary indexes (the hash rows' uris differ: other feature outputs' paths)
    indexes = lambda block: [f["sha256"] for f in block["files"] if f["file"].endswith(".index")]  # noqa: E731
    assert indexes(spark_block) == indexes(local_block) and len(indexes(local_block)) == 2
    hashes = os.path.join("pdq", "shard-00000", "hashes.parquet")
    assert pq.read_table(os.path.join(index, hashes)).select(["image_id", "pdq"]).equals(
        pq.read_table(os.path.join(built["index"], hashes)).select(["image_id", "pdq"]))


@pytest.mark.parametrize("engine", ["local", "spark"])
def test_a_sharded_pdq_index_matches_the_rows_of_one_unsharded_index(photos, built, tmp_path, engine, request):
    """pdq.shard_rows cuts the PDQ index into shards built in their own tasks; match runs a task
    per (list chunk, shard) and merges: the same rows and part files as the one-shard index."""
    spark = request.getfixturevalue("spark") if engine == "spark" else None
    one = read_index_manifest(built["index"])["pdq"]
    assert [s["count"] for s in one["shards"]] == [N_GALLERY]
    sharded = str(tmp_path / "index")
    block = build_index(built["features"], sharded, cfg(**{"pdq.shard_rows": 5}), spark)["pdq"]
    assert [(s["shard"], s["count"], s["offset"]) for s in block["shards"]] == [(0, 4, 0), (1, 4, 4)]
    assert block["quality"]["nflip=auto"]["recall_vs_brute_force"] == 1.0 and block["count"] == N_GALLERY
    assert sorted(os.listdir(os.path.join(sharded, "pdq"))) == ["shard-00000", "shard-00001"]
    listed = str(tmp_path / "both.csv")
    export(built["features"], listed, cfg())
    with open(listed, "a") as fh:
        fh.write("".join(open(_query_list(photos, tmp_path)).readlines()[1:]))
    for sets in ({"pdq.dihedral": "true", "pdq.max_distance": 64, "pdq.chunk_rows": 5},
                 {"pdq.max_distance": 64, "pdq.top_k": 1, "pdq.chunk_rows": 3}):
        name = "-".join(map(str, sets.values()))
        a = match(listed, built["index"], str(tmp_path / f"one{name}"), cfg(**sets), spark)
        b = match(listed, sharded, str(tmp_path / f"sharded{name}"), cfg(**sets), spark)
        rows = read_results(str(tmp_path / f"sharded{name}"))
        assert rows.num_rows >= N_GALLERY and read_results(str(tmp_path / f"one{name}")).equals(rows)
        assert [f["sha256"] for f in a["files"]] == [f["sha256"] for f in b["files"]] and len(b["files"]) > 1
        hashes = [pq.read_table(os.path.join(sharded, "pdq", f"shard-{s:05d}", "hashes.parquet")) for s in (0, 1)]
        found = set(rows.column("gallery_id").to_pylist())
        assert all(found & set(h.column("image_id").to_pylist()) for h in hashes)    # both shards matched


def test_duplicate_ids_across_shards_are_indexed_once(photos, built, tmp_path):
    """index.duplicates=skip over a sharded PDQ index: the second feature output's images (the same
    ids) are left out of every shard, so matching gives the rows of the one-output index."""
    again = str(tmp_path / "again")
    extract(photos["gallery"], again, cfg())
    index = str(tmp_path / "index")
    block = build_index([built["features"], again], index, cfg(**{"pdq.shard_rows": 5}), None)["pdq"]
    assert block["count"] == N_GALLERY and [s["count"] for s in block["shards"]] == [4, 4, 0, 0]
    listed = str(tmp_path / "l.csv")
    export(built["features"], listed, cfg())
    match(listed, built["index"], str(tmp_path / "one"), cfg(**{"pdq.max_distance": 64}))
    match(listed, index, str(tmp_path / "two"), cfg(**{"pdq.max_distance": 64}))
    assert read_results(str(tmp_path / "one")).equals(read_results(str(tmp_path / "two")))
