"""The stage-output contract (retrieval/outputs.py): one marker name, begin / commit / read."""
from __future__ import annotations

import json
import logging

import pytest

from retrieval import config, outputs
from retrieval.engine import LOCAL


def test_begin_commit_read(tmp_path):
    out = str(tmp_path / "o")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "part-0.bin").write_bytes(b"abc")
    with pytest.raises(FileNotFoundError, match=r"o has no _manifest.json: not a \(complete\) search output"):
        outputs.read(out, "search")
    assert outputs.find(out, "search") is None
    m = outputs.commit(out, "search", {"counts": {"rows": 1},
                                       "files": outputs.file_entries(out, ["part-0.bin"])},
                       engine=LOCAL, cfg=config.load())
    assert m["stage"] == "search" and m["engine"] == "local" and m["config"] == config.load().to_dict()
    assert m["files"] == [{"file": "part-0.bin", "bytes": 3,
                           "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}]
    assert outputs.read(out, "search") == json.loads((tmp_path / "o" / "_manifest.json").read_text()) == m
    assert outputs.find(out, "search") == m
    # another stage's marker: an error for read, None for find
    with pytest.raises(outputs.WrongStageError, match="stage is 'search', expected 'extract'"):
        outputs.read(out, "extract")
    assert outputs.find(out, "extract") is None
    outputs.begin(out)                                  # a rerun: incomplete from now on
    assert not (tmp_path / "o" / "_manifest.json").exists() and (tmp_path / "o" / "part-0.bin").exists()
    outputs.begin(out)                                  # nothing to remove: fine


def test_a_marker_that_is_not_json_is_an_error_not_absent(tmp_path):
    (tmp_path / "_manifest.json").write_text("{not json")
    with pytest.raises(outputs.OutputError, match="not valid JSON"):
        outputs.find(str(tmp_path), "extract")
    (tmp_path / "_manifest.json").write_text("[1, 2]")
    with pytest.raises(outputs.OutputError, match="expected a JSON object"):
        outputs.read(str(tmp_path), "extract")


def test_an_index_of_the_old_marker_name_is_read_and_renamed_on_commit(tmp_path, caplog):
    old = {"stage": "index", "ntotal": 5}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="retrieval.outputs"):
        assert outputs.read(str(tmp_path), "index") == old
    assert "pre-0.2 name" in caplog.text
    assert outputs.marker_of(str(tmp_path), "index").endswith("/manifest.json")
    # only the index had the old name
    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        outputs.read(str(tmp_path), "search")
    outputs.commit(str(tmp_path), "index", {"ntotal": 6})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_manifest.json"]
    assert outputs.read(str(tmp_path), "index")["ntotal"] == 6


# ---------------------------------------------------------------------------------------------
# identity and lease (issue 22)
def _snapshot(root):
    import os
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = (os.path.getsize(p), os.stat(p).st_mtime_ns)
    return out


def _claim_and_release(out, ident, cfg=None, **kw):
    @outputs.leased
    def stage():
        outputs.claim(out, ident, cfg, **kw)
        assert (outputs.fsio.exists(outputs.fsio.join(out, outputs.LEASE)) if not kw.get("file")
                else outputs.fsio.exists(out + ".lease.json"))
    stage()


def test_identity_same_resumes_anything_else_is_refused_before_any_write(tmp_path):
    cfg = config.load()
    out = str(tmp_path / "o")
    gallery = outputs.identity("extract", cfg, ["/in/a"], "gallery")
    _claim_and_release(out, gallery)                                # empty: taken
    assert json.loads((tmp_path / "o" / "_identity.json").read_text()) == gallery
    assert not (tmp_path / "o" / "_lease.json").exists()            # released
    (tmp_path / "o" / "part-00000.parquet").write_bytes(b"x")
    _claim_and_release(out, outputs.identity("extract", cfg, ["/in/a/"], "gallery"))   # same: resumes
    refused = {
        "another stage": (outputs.identity("search", cfg, ["/in/a"]),
                          r"holds an extract output, not a search output"),
        "another role": (outputs.identity("extract", cfg, ["/in/a"], "query"),
                         r"holds an extract output \(role 'gallery', this run's is 'query'\)"),
        "another input": (outputs.identity("extract", cfg, ["/in/b"], "gallery"),
                          r"\(input /in/a, this run's is /in/b\)"),
        "other settings": (outputs.identity("extract", config.load(sets=["preprocess.size_hi=256"]),
                                            ["/in/a"], "gallery"),
                           r"\(other settings \(model/preprocess/extract\)\)"),
    }
    before = _snapshot(tmp_path)
    for name, (ident, msg) in refused.items():
        with pytest.raises(outputs.OutputExistsError, match=msg + r"; nothing was written: pass --overwrite"):
            _claim_and_release(out, ident)
        assert _snapshot(tmp_path) == before, name                  # nothing written or removed
    # settings that only change speed or layout are the same identity
    _claim_and_release(out, outputs.identity("extract", config.load(sets=[
        "extract.num_shards=3", "extract.threads=2", "extract.batch_size=8", "model.device=cpu",
        "spark.master=local[1]"]), ["/in/a"], "gallery"))
    # --overwrite: taken, and the new identity recorded
    _claim_and_release(out, refused["another role"][0], overwrite=True)
    assert json.loads((tmp_path / "o" / "_identity.json").read_text())["role"] == "query"


def test_a_foreign_folder_or_file_is_refused_and_an_old_marker_is_read(tmp_path):
    cfg = config.load()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"jpeg")
    before = _snapshot(tmp_path)
    with pytest.raises(outputs.OutputExistsError, match=r"photos holds a non-empty folder that is not the "
                                                        r"output of any retrieval stage; nothing was written"):
        _claim_and_release(str(tmp_path / "photos"), outputs.identity("report", cfg, ["/r"]))
    assert _snapshot(tmp_path) == before
    (tmp_path / "model.pt").write_bytes(b"weights")
    with pytest.raises(outputs.OutputExistsError, match=r"model.pt holds a file that is not the output"):
        _claim_and_release(str(tmp_path / "model.pt"), outputs.identity("fit", cfg, ["/g"]), file=True)
    _claim_and_release(str(tmp_path / "new.pt"), outputs.identity("fit", cfg, ["/g"]), file=True)
    assert json.loads((tmp_path / "new.pt.identity.json").read_text())["stage"] == "fit"
    assert not (tmp_path / "new.pt.lease.json").exists()
    # an output written before identities: its marker's stage (and role) decide
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "_manifest.json").write_text(json.dumps({"stage": "search"}))
    _claim_and_release(str(tmp_path / "old"), outputs.identity("search", cfg, ["/q", "/i"]))
    with pytest.raises(outputs.OutputExistsError, match="holds a search output, not a report output"):
        _claim_and_release(str(tmp_path / "old"), outputs.identity("report", cfg, ["/r"]))
    # index --append: the same stage and settings, more inputs
    idx = str(tmp_path / "idx")
    _claim_and_release(idx, outputs.identity("index", cfg, ["/f/day1"]))
    with pytest.raises(RuntimeError):      # an append refused by the index's own checks: inputs unchanged
        @outputs.leased
        def refused():
            outputs.claim(idx, outputs.identity("index", cfg, ["/f/other-model"]), append=True)
            raise RuntimeError("model_version mismatch")
        refused()
    assert json.loads((tmp_path / "idx" / "_identity.json").read_text())["inputs"] == ["/f/day1"]

    @outputs.leased
    def append():
        outputs.claim(idx, outputs.identity("index", cfg, ["/f/day2"]), append=True)
        outputs.commit(idx, "index", {})
    append()
    assert json.loads((tmp_path / "idx" / "_identity.json").read_text())["inputs"] == ["/f/day1", "/f/day2"]
    with pytest.raises(outputs.OutputExistsError, match="other settings"):
        _claim_and_release(idx, outputs.identity("index", config.load(sets=["index.nlist=64"]), ["/f/d3"]),
                           append=True)


def _lease_cases(url, seconds=0.6):
    """A live lease refuses a second writer; an expired one (its holder killed: no heartbeat) is taken over."""
    import time

    from retrieval.lease import Lease

    first = Lease(url, "o", "extract", seconds).acquire()
    time.sleep(seconds * 1.5)                      # beyond the expiry: the heartbeat has renewed it
    with pytest.raises(outputs.LeaseHeldError, match=r"o is being written by another run \(extract on .*pid "
                                                     r"\d+, since .*\); its lease expires at .*Z unless renewed"):
        Lease(url, "o", "extract", seconds).acquire()
    first._stop.set()                              # the holder dies: no more renewals, nothing removed
    first._thread.join()
    time.sleep(seconds * 1.2)
    second = Lease(url, "o", "extract", seconds).acquire()
    assert second.holder()["owner"] == second.owner
    first.release()                                # the dead run's cleanup must not remove the new lease
    assert second.holder()["owner"] == second.owner
    second.release()
    assert second.holder() is None


def test_lease_local(tmp_path):
    _lease_cases(str(tmp_path / "o" / "_lease.json"))


def test_lease_on_s3_uses_a_conditional_put(s3):
    from retrieval import fsio
    url = f"{s3['bucket']}/lease-test/o/_lease.json"
    _lease_cases(url)
    fs, path = fsio.url_to_fs(url)
    fs.pipe_file(path, b"{}", mode="create")       # the server honours If-None-Match: * (moto does)
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"{}", mode="create")
    fs.rm(path)


def test_a_failed_stage_releases_its_lease(tmp_path):
    out = str(tmp_path / "o")

    @outputs.leased
    def stage(writes: bool):
        outputs.claim(out, outputs.identity("report", config.load(), ["/r"]))
        if writes:
            (tmp_path / "o" / "report.html").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):      # failed before writing: no trace left
        stage(writes=False)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == []
    with pytest.raises(RuntimeError, match="boom"):      # failed midway: the identity stays
        stage(writes=True)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["_identity.json", "report.html"]
    _claim_and_release(out, outputs.identity("report", config.load(), ["/r"]))   # the rerun resumes
    with pytest.raises(outputs.OutputExistsError, match="holds a report output"):
        _claim_and_release(out, outputs.identity("report", config.load(), ["/other"]))


def test_every_writing_subcommand_takes_overwrite_and_it_is_the_mode_where_one_exists():
    from retrieval import cli

    sub = next(a for a in cli.build_parser()._actions if a.dest == "stage")
    takes = {name for name, p in sub.choices.items() if any("--overwrite" in a.option_strings for a in p._actions)}
    # plan writes nothing; remove changes an index in place, by design (no output of its own to replace)
    assert takes == set(sub.choices) - {"plan", "remove"}
    from retrieval import registry

    for stage in ("extract", "index"):
        args = cli.build_parser().parse_args([stage, "--overwrite", "--output", "o",
                                             *(["--input", "i"] if stage == "extract" else ["--features", "f"])])
        inputs, _, overrides = cli._split(registry.get(stage), args)
        assert overrides[f"{stage}.mode"] == "overwrite" and inputs["overwrite"] is True
    args = cli.build_parser().parse_args(["search", "--queries", "q", "--index", "i", "--output", "o"])
    inputs, _, overrides = cli._split(registry.get("search"), args)
    assert "search.mode" not in overrides and inputs["overwrite"] is False


def _hash_before_pdq(cfg) -> str:
    """A gallery's extract settings hash as computed before extract.pdq and extract.query_regions existed."""
    import hashlib

    values = {}
    for section in outputs.SETTINGS["extract"][0]:
        for key, v in outputs._flat(cfg[section].to_dict(), section).items():
            if key not in ("extract.pdq", "extract.query_regions") and key not in outputs.SETTINGS["extract"][1] \
                    and key.rsplit(".", 1)[-1] not in outputs.RUNTIME \
                    and not (key in outputs.OMITTED_AT and v == outputs.OMITTED_AT[key]):   # other new keys
                values[key] = outputs.HASHED_AS.get(key, v)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_extract_pdq_at_its_default_keeps_the_identity_of_outputs_written_before_it(tmp_path):
    cfg = config.load()
    assert cfg["extract.pdq"] is False and "extract.pdq" in dict(outputs._flat(cfg["extract"].to_dict(), "extract"))
    assert outputs.identity("extract", cfg, ["/in/a"], "gallery")["settings"] == _hash_before_pdq(cfg)
    sized = config.load(sets=["preprocess.size_hi=256"])
    assert outputs.identity("extract", sized, ["/in/a"], "gallery")["settings"] == _hash_before_pdq(sized) \
        != _hash_before_pdq(cfg)
    # an output claimed the old way (identity written before extract.pdq existed) resumes without --overwrite
    out = str(tmp_path / "o")
    old = dict(outputs.identity("extract", cfg, ["/in/a"], "gallery"), settings=_hash_before_pdq(cfg))
    _claim_and_release(out, old)
    (tmp_path / "o" / "part-00000.parquet").write_bytes(b"x")
    _claim_and_release(out, outputs.identity("extract", config.load(), ["/in/a"], "gallery"))
    # turning it on changes the output (PDQ columns), so it changes the identity and is refused
    on = outputs.identity("extract", config.load(sets=["extract.pdq=true"]), ["/in/a"], "gallery")
    assert on["settings"] != old["settings"]
    with pytest.raises(outputs.OutputExistsError, match=r"other settings \(model/preprocess/extract\)"):
        _claim_and_release(out, on)


def test_query_regions_enter_only_the_query_roles_identity():
    cfg, off = config.load(), config.load(sets=["extract.query_regions=[]"])
    assert cfg["extract.query_regions"] and not off["extract.query_regions"]

    def settings(c, role):
        return outputs.identity("extract", c, ["/in"], role)["settings"]
    # a gallery has no query regions: its identity (and outputs written before the key) do not change
    assert settings(cfg, "gallery") == settings(off, "gallery")
    # a query output's rows do: regions on and off are different settings
    assert settings(cfg, "query") != settings(off, "query")
    # regions off hashes as before the key existed (the same values as the gallery's)
    assert settings(off, "query") == settings(cfg, "gallery")
