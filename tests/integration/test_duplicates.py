"""``retrieval duplicates`` end to end on a small gallery with planted near-duplicate groups (real Parquet
feature output, a real faiss index built by the index stage, the search's cascade, real Spark): the groups
are the planted ones on both engines (a chain whose ends do not match each other included), agree with
networkx on the kept pairs, the threshold comes from false-match rates when a background is given, and
search.collapse_groups keeps one row per group."""
from __future__ import annotations

import json
import os

import networkx as nx
import numpy as np
import pyarrow.parquet as pq
import pytest

from retrieval import config
from retrieval.duplicates.groups import read_edges, read_groups
from retrieval.duplicates.job import duplicates
from retrieval.search import read_results, search

from tests import synthetic

N, DIM, CDIM = 1500, 512, 128


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _near(v, rng, cos):
    """A unit vector at cosine ~``cos`` to the unit vector ``v``."""
    noise = rng.standard_normal(v.shape).astype(np.float32)
    noise -= (noise @ v) * v
    noise /= np.linalg.norm(noise)
    return (cos * v + np.sqrt(1 - cos * cos) * noise).astype(np.float32)


def _planted(seed=0):
    """(fine, planted groups as sets of row numbers): random images, groups of 2-6 copies at cosine
    ~0.95 of an original, and a chain a-b-c (0.9 each step, a-c ~0.81 < min_score 0.85)."""
    rng = np.random.default_rng(seed)
    fine = _unit(rng.standard_normal((N, DIM)))
    groups, row = [], 0
    for size in [6, 5, 4, 3, 3, 2, 2, 2, 2, 2]:
        members = [row + i for i in range(size)]
        for m in members[1:]:
            fine[m] = _near(fine[members[0]], rng, 0.95)
        groups.append(set(members))
        row += size
    a, b, c = row, row + 1, row + 2                # the chain
    fine[b] = _near(fine[a], rng, 0.9)
    fine[c] = _unit(_near(fine[b], rng, 0.9)[None])[0]
    while float(fine[a] @ fine[c]) > 0.84:          # its ends below the threshold
        fine[c] = _near(fine[b], rng, 0.9)
    groups.append({a, b, c})
    return fine, groups


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from retrieval.index.build import build_index

    root = tmp_path_factory.mktemp("dupes")
    fine, planted = _planted()
    proj = np.random.default_rng(1).standard_normal((DIM, CDIM)).astype(np.float32)
    gal = str(root / "gallery")
    synthetic.write_feature_output(gal, _unit(fine @ proj), fine, num_files=3, storage="int8", row_group_size=256)
    bg_fine = _unit(np.random.default_rng(2).standard_normal((300, DIM)))
    bg = str(root / "background")
    synthetic.write_feature_output(bg, _unit(bg_fine @ proj), bg_fine, num_files=1, id_prefix="bg")
    idx = str(root / "index")
    build_index([gal], idx, config.load(sets=["index.index_key=IVF16,PQ16x4", "index.vectors_per_shard=600",
                                              "index.quality_queries=50"]), engine=None)
    ids = {synthetic.image_id(i) for i in range(N)}
    assert len(ids) == N
    groups = [{synthetic.image_id(i) for i in g} for g in planted]
    return {"root": root, "index": idx, "groups": groups, "background": bg, "fine": fine}


def _cfg(**sets):
    base = {"search.query_chunk": 400, "search.shortlist": 60, "search.nprobe": 16, "duplicates.k": 8,
            "duplicates.min_score": 0.85}
    base.update(sets)
    return config.load(sets=[f"{k}={v}" for k, v in base.items()])


def _groups_of(url):
    t = read_groups(url).to_pydict()
    out: dict[int, set] = {}
    for image, gid in zip(t["image_id"], t["group_id"]):
        out.setdefault(gid, set()).add(image)
    return t, sorted(out.values(), key=lambda g: (-len(g), min(g)))


def test_planted_groups_on_both_engines(world, spark, tmp_path):
    lib = duplicates(world["index"], str(tmp_path / "lib"), _cfg(), engine=None)
    spk = duplicates(world["index"], str(tmp_path / "spark"), _cfg(), engine=spark)
    expected = sorted(world["groups"], key=lambda g: (-len(g), min(g)))
    t, got = _groups_of(str(tmp_path / "lib"))
    assert got == expected                                    # every planted group, nothing else
    assert _groups_of(str(tmp_path / "spark"))[0] == t         # same rows, same ids, both engines
    assert read_edges(str(tmp_path / "spark")).equals(read_edges(str(tmp_path / "lib")))
    # Spark writes the groups and edges itself, as sorted parts (nothing row-sized on the driver)
    assert not (tmp_path / "spark" / "groups.parquet").exists() and (tmp_path / "spark" / "groups").is_dir()
    assert pq.read_table(tmp_path / "spark" / "groups").num_rows == 34
    assert {f["file"].split("/")[0] for f in spk["files"]} >= {"groups", "edges", "pairs"}
    from retrieval.index.store import read_index_manifest
    from retrieval.search.collapse import load_groups
    im = read_index_manifest(world["index"])          # the search's collapse reads either form alike
    assert load_groups(str(tmp_path / "spark"), world["index"], im) == load_groups(str(tmp_path / "lib"),
                                                                                   world["index"], im)
    assert lib["counts"] == spk["counts"] and lib["sizes"] == spk["sizes"]
    assert lib["counts"]["groups"] == 11 and lib["counts"]["grouped_images"] == 34
    assert lib["counts"]["largest_group"] == 6 and lib["counts"]["images"] == N
    assert lib["sizes"] == {"2": 5, "3-4": 4, "5-8": 2}
    assert lib["largest"][0]["size"] == 6 and lib["largest"][0]["group_id"] == 0
    assert lib["threshold"]["source"] == "min_score" and lib["threshold"]["column"] == "score"
    # sizes and representatives: group 0 is the six copies; the chain's representative is its middle
    rows = list(zip(t["image_id"], t["group_id"], t["representative"], t["size"], t["degree"]))
    assert {r[3] for r in rows if r[1] == 0} == {6}
    chain = [r for r in rows if r[0] in next(g for g in world["groups"] if len(g) == 3 and
                                              synthetic.image_id(32) in g)]
    assert {r[2] for r in chain} == {synthetic.image_id(32)} and sorted(r[4] for r in chain) == [1, 1, 2]
    # the kept pairs: no self-pair, the chain's ends not paired, components agree with networkx
    edges = pq.read_table(tmp_path / "lib" / "edges.parquet").to_pydict()
    assert all(a < b for a, b in zip(edges["image_a"], edges["image_b"]))
    assert (synthetic.image_id(31), synthetic.image_id(33)) not in set(zip(edges["image_a"], edges["image_b"]))
    g = nx.Graph(list(zip(edges["image_a"], edges["image_b"])))
    assert sorted(nx.connected_components(g), key=lambda c: (-len(c), min(c))) == expected
    assert min(edges["score"]) >= 0.85
    m = json.loads((tmp_path / "lib" / "_manifest.json").read_text())
    assert m["stage"] == "duplicates" and {f["file"] for f in m["files"]} >= {"groups.parquet", "edges.parquet"}


def test_the_threshold_from_false_match_rates(world, tmp_path):
    out = str(tmp_path / "bg")
    m = duplicates(world["index"], out, _cfg(**{"search.normalize.background": world["background"],
                                                "search.normalize.fmr_queries": 300,
                                                "duplicates.max_fmr": 0.001}), engine=None)
    th = m["threshold"]
    assert th["source"] == "max_fmr" and th["column"] == "norm_score" and m["calibration"] is not None
    assert 0.1 < th["value"] < 0.8                        # far above unrelated pairs, below the copies
    _, got = _groups_of(out)
    # at this rate the chain's ends (cosine ~0.81) are paired too: the same groups
    assert got == sorted(world["groups"], key=lambda g: (-len(g), min(g)))


def test_search_collapses_results_to_one_row_per_group(world, spark, tmp_path):
    groups_url = str(tmp_path / "groups")
    duplicates(world["index"], groups_url, _cfg(), engine=None)
    spark_groups = str(tmp_path / "spark_groups")     # the groups in parts, as Spark writes them
    duplicates(world["index"], spark_groups, _cfg(), engine=spark)
    # queries: the originals of the planted groups, as query features (role query), in two chunks
    qf = str(tmp_path / "queries")
    fine = world["fine"][[0, 6, 11]]
    proj = np.random.default_rng(1).standard_normal((DIM, CDIM)).astype(np.float32)
    synthetic.write_feature_output(qf, _unit(fine @ proj), fine, num_files=1, role="query", id_prefix="q")
    plain = search(qf, world["index"], str(tmp_path / "plain"), _cfg(**{"search.k": 8}), engine=None)
    folded = search(qf, world["index"], str(tmp_path / "folded"),
                    _cfg(**{"search.k": 8, "search.collapse_groups": groups_url, "search.query_chunk": 2}),
                    engine=None)
    on_spark = search(qf, world["index"], str(tmp_path / "folded_spark"),
                      _cfg(**{"search.k": 8, "search.collapse_groups": spark_groups, "search.query_chunk": 2}),
                      engine=spark)
    p, f = read_results(str(tmp_path / "plain")).to_pydict(), read_results(str(tmp_path / "folded")).to_pydict()
    assert read_results(str(tmp_path / "folded_spark")).to_pydict() == f       # same rows on both engines
    t = read_groups(groups_url).to_pydict()
    group_of = dict(zip(t["image_id"], t["group_id"]))
    for q in ("q0000000000", "q0000000001", "q0000000002"):
        got = [(r, g) for qq, r, g in zip(f["query_id"], f["rank"], f["gallery_id"]) if qq == q]
        assert [r for r, _ in got] == list(range(1, len(got) + 1))           # ranks renumbered
        grouped = [group_of[g] for _, g in got if g in group_of]
        assert len(grouped) == len(set(grouped)) == 1                       # one row of its group
        before = [g for qq, g in zip(p["query_id"], p["gallery_id"]) if qq == q]
        assert got[0][1] == before[0] and sum(g in group_of for g in before) >= 2
    for m in (folded, on_spark):
        assert m["counts"]["rows_collapsed"] == 5 + 4 + 3 and m["counts"]["rows"] == len(p["query_id"]) - 12
        assert [c["rows_collapsed"] for c in m["chunks"]] == [5 + 4, 3]
    assert folded["params"]["collapse_groups"] == groups_url and plain["counts"]["rows_collapsed"] == 0


def test_the_report_shows_the_largest_groups(world, tmp_path):
    from retrieval.report import build_report

    groups_url = str(tmp_path / "groups")
    duplicates(world["index"], groups_url, _cfg(), engine=None)
    qf = str(tmp_path / "queries")
    fine = world["fine"][[0, 40]]
    proj = np.random.default_rng(1).standard_normal((DIM, CDIM)).astype(np.float32)
    synthetic.write_feature_output(qf, _unit(fine @ proj), fine, num_files=1, role="query", id_prefix="q")
    search(qf, world["index"], str(tmp_path / "results"), _cfg(), engine=None)
    cfg = config.load(sets=[f"report.duplicates={groups_url}", "report.groups_shown=2", "report.group_members=4"])
    summary = build_report(str(tmp_path / "results"), str(tmp_path / "report"), cfg)
    assert summary["duplicate_groups"]["shown"] == [
        {"group_id": 0, "size": 6, "representative": synthetic.image_id(0)},
        {"group_id": 1, "size": 5, "representative": synthetic.image_id(6)}]
    page = (tmp_path / "report" / "report.html").read_text()
    section = page[page.index('<section id="groups">'):page.index('<section id="distribution">')]
    assert section.count('<div class="q">') == 2 and section.count("<figure>") == 8      # 4 of each group
    assert "2 more in groups.parquet" in section and "1 more in groups.parquet" in section
    assert f"representative <span class=\"id\">{synthetic.image_id(0)}</span>" in section
    # synthetic URIs are no files under the input roots: placeholders saying why, never broken images
    assert section.count('class="ph"') == 8
    without = build_report(str(tmp_path / "results"), str(tmp_path / "plain"), config.load())
    assert "duplicate_groups" not in without
    assert '<section id="groups">' not in (tmp_path / "plain" / "report.html").read_text()


def test_removed_images_are_in_no_group_on_both_engines(world, spark, tmp_path):
    """After retrieval remove, a removed image is still a query of the self-search (every feature row
    is): its pairs are dropped, so the chain whose middle it was falls apart on both engines."""
    import shutil

    from retrieval.remove.job import remove

    index = str(tmp_path / "index")
    shutil.copytree(world["index"], index)
    ids = tmp_path / "ids.txt"
    ids.write_text(synthetic.image_id(32) + "\n")
    remove(index, str(ids), _cfg(), engine=None)
    got = {}
    for name, engine in (("lib", None), ("spark", spark)):
        m = duplicates(index, str(tmp_path / name), _cfg(), engine=engine)
        t, groups = _groups_of(str(tmp_path / name))
        edges = read_edges(str(tmp_path / name)).to_pydict()
        assert synthetic.image_id(32) not in set(t["image_id"]) | set(edges["image_a"]) | set(edges["image_b"])
        assert m["counts"]["groups"] == 10 and m["counts"]["grouped_images"] == 31
        got[name] = groups
    assert got["lib"] == got["spark"] == sorted([g for g in world["groups"] if synthetic.image_id(32) not in g],
                                                key=lambda g: (-len(g), min(g)))


def test_no_pair_above_the_threshold_gives_no_group(world, tmp_path):
    m = duplicates(world["index"], str(tmp_path / "none"), _cfg(**{"duplicates.min_score": 0.999}), engine=None)
    assert m["counts"]["groups"] == m["counts"]["grouped_images"] == m["counts"]["pairs_kept"] == 0
    assert m["counts"]["pairs"] == N * 9 and m["sizes"] == {} and m["largest"] == []
    assert read_groups(str(tmp_path / "none")).num_rows == 0
    assert pq.read_table(tmp_path / "none" / "edges.parquet").num_rows == 0


def test_no_pair_above_the_threshold_on_spark(world, spark, tmp_path):
    m = duplicates(world["index"], str(tmp_path / "none"), _cfg(**{"duplicates.min_score": 0.999}), engine=spark)
    assert m["counts"]["groups"] == m["counts"]["pairs_kept"] == m["counts"]["edges"] == 0 and m["sizes"] == {}
    assert read_groups(str(tmp_path / "none")).schema.names == ["image_id", "uri", "group_id", "representative",
                                                                "size", "degree"]
    assert read_groups(str(tmp_path / "none")).num_rows == read_edges(str(tmp_path / "none")).num_rows == 0


def test_real_photos_with_planted_copies_through_the_cli(tmp_path):
    """Real photos (the bundled sample's holdout photos) and planted copies (half size, a crop, a
    re-encode), extracted and indexed with the shipped model, then `retrieval duplicates` on the
    command line: every copy lands in its original's group, and the groups agree with networkx."""
    import shutil

    from PIL import Image

    from retrieval import cli
    from retrieval.sample import real_photos

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    photos = real_photos("holdout")[:12]
    for p in photos:
        shutil.copy(p, gallery / os.path.basename(p))
    planted = []
    for i, p in enumerate(photos[:3]):
        img = Image.open(p).convert("RGB")
        w, h = img.size
        stem = os.path.splitext(os.path.basename(p))[0]
        for c, v in enumerate([img.resize((w // 2, h // 2)), img.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
                               img][:3 - i]):
            v.save(gallery / f"dup{c}_{stem}.jpg", "JPEG", quality=[80, 85, 60][c])
            planted.append((os.path.basename(p), f"dup{c}_{stem}.jpg"))
    feats, idx, out = (str(tmp_path / n) for n in ("feats", "idx", "dupes"))
    for argv in (["extract", "--input", str(gallery), "--output", feats, "--role", "gallery"],
                 ["index", "--features", feats, "--output", idx], ["duplicates", "--index", idx, "--output", out]):
        assert cli.main([*argv, "--engine", "local"]) in (0, None)
    t = read_groups(out).to_pydict()
    group_of = dict(zip(t["image_id"], t["group_id"]))
    for original, copy in planted:
        assert copy in group_of and group_of[copy] == group_of[original], (original, copy)
    edges = pq.read_table(os.path.join(out, "edges.parquet")).to_pydict()
    g = nx.Graph(list(zip(edges["image_a"], edges["image_b"])))
    assert {frozenset(c) for c in nx.connected_components(g)} == \
        {frozenset(i for i, gid in group_of.items() if gid == k) for k in set(group_of.values())}
    m = json.loads(open(os.path.join(out, "_manifest.json")).read())
    assert m["counts"]["images"] == len(photos) + len(planted) and m["counts"]["largest_group"] >= 4


@pytest.mark.parametrize("rerank", ["gallery", "chunk"])
def test_sliced_self_search_gives_the_unsliced_rows_on_both_engines(world, spark, tmp_path, rerank):
    """duplicates.slice_images cuts the self-search into slices of chunks (each its own search plan):
    the pair rows, groups and edges are those of one unsliced run, on both engines."""
    sets = {"search.rerank": rerank, "search.vector_cache_mb": 1}
    whole = duplicates(world["index"], str(tmp_path / "whole"), _cfg(**sets, **{"duplicates.slice_images": N}))
    assert whole["params"]["slices"] == 1 and whole["params"]["rerank"] == rerank
    assert whole["params"]["blocks"] == (1 if rerank == "gallery" else 0)   # the whole column is one block
    ref = pq.read_table(str(tmp_path / "whole" / "pairs")).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    for name, engine in (("lib", None), ("spark", spark)):
        out = tmp_path / name
        m = duplicates(world["index"], str(out), _cfg(**sets, **{"duplicates.slice_images": 700}), engine=engine)
        assert m["params"]["slices"] == 3 and m["params"]["chunks"] == 6   # 3 files x (400 + 100) rows
        assert sorted(p.name for p in (out / "pairs").iterdir()) == [f"part-{i:05d}.parquet" for i in range(6)]
        got = pq.read_table(str(out / "pairs")).sort_by([("query_id", "ascending"), ("rank", "ascending")])
        assert got.num_rows == ref.num_rows == N * 9
        for col in ("query_id", "gallery_id", "rank", "score"):
            assert got.column(col).to_pylist() == ref.column(col).to_pylist(), col
        assert read_groups(str(out)).equals(read_groups(str(tmp_path / "whole")))
        assert read_edges(str(out)).equals(read_edges(str(tmp_path / "whole")))
        assert m["counts"] == whole["counts"]


def test_spark_writes_its_parts_to_s3(world, spark, s3, tmp_path):
    """The Spark path's tasks read the pairs and write ``groups/`` and ``edges/`` on S3 (moto), with
    the output's storage options: the rows are those of the local engine's run on a local folder."""
    lib = duplicates(world["index"], str(tmp_path / "lib"), _cfg(), engine=None)
    url = f"{s3['bucket']}/dupes-{tmp_path.name}"
    opts = f'endpoint_url: "{s3["endpoint"]}", key: testing, secret: testing'   # Spark's workers may predate s3
    cfg = _cfg(**{"io.storage_options": f"{{s3: {{{opts}}}}}"})
    m = duplicates(world["index"], url, cfg, engine=spark)
    assert m["counts"] == lib["counts"] and any(f["file"].startswith("groups/part-") for f in m["files"])
    assert read_groups(url).equals(read_groups(str(tmp_path / "lib")))
    assert read_edges(url).equals(read_edges(str(tmp_path / "lib")))
    # a search on S3 collapsed by the groups on S3: the join's tasks read and rewrite there
    qf = str(tmp_path / "queries")
    fine = world["fine"][[0, 6, 11]]
    proj = np.random.default_rng(1).standard_normal((DIM, CDIM)).astype(np.float32)
    synthetic.write_feature_output(qf, _unit(fine @ proj), fine, num_files=1, role="query", id_prefix="q")
    sets = {"search.k": 8, "search.query_chunk": 2}
    here = search(qf, world["index"], str(tmp_path / "folded"),
                  _cfg(**sets, **{"search.collapse_groups": str(tmp_path / "lib")}), engine=None)
    there = search(qf, world["index"], f"{url}-results",
                   _cfg(**sets, **{"search.collapse_groups": url, "io.storage_options": f"{{s3: {{{opts}}}}}"}),
                   engine=spark)
    assert there["counts"]["rows_collapsed"] == here["counts"]["rows_collapsed"] == 12
    assert read_results(f"{url}-results").equals(read_results(str(tmp_path / "folded")))
