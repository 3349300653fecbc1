"""Outputs are never silently replaced, and one run writes an output at a time (issue 22): the real
extraction (and index) stages, on local files and on S3 (moto), through the library and the CLI.

- another stage, role, input or settings, or a folder that is no stage output: refused before any
  write, nothing written or removed; the same identity resumes; ``--overwrite`` replaces;
- a live lease (another run writing): refused, naming the holder; an expired one: taken over."""
from __future__ import annotations

import json
import os
import time

import pytest

from retrieval import cli, config, fsio, outputs
from retrieval.extract.job import extract, read_manifest
from retrieval.lease import Lease

N_IMAGES = 8


def _images(d) -> str:
    from PIL import Image

    os.makedirs(d, exist_ok=True)
    for i in range(N_IMAGES):
        img = Image.new("RGB", (64, 48), (40 * i, 200 - 30 * i, 90))
        img.paste((255, 255, 255), (i * 8, 5, i * 8 + 20, 25))
        img.save(os.path.join(d, f"img{i}.jpg"))
    return str(d)


def _cfg(*sets, storage_options=None):
    base = ["extract.num_shards=3", "extract.batch_size=8", "extract.storage=float32", "io.lease_seconds=1.5"]
    return config.load(sets=[*base, *sets], overrides={"io.storage_options": storage_options or {}})


def _snapshot(url) -> dict:
    """Every object under ``url`` with its size and content hash (the live lease left out)."""
    fs, root = fsio.url_to_fs(url)
    return {p: fsio.sha256_file(fsio.to_url(fs, p)) for p in fs.find(root)
            if not p.endswith(outputs.LEASE)}


def _refused_before_any_write(url, run, match):
    before = _snapshot(url)
    with pytest.raises((outputs.OutputExistsError, outputs.LeaseHeldError), match=match):
        run()
    assert _snapshot(url) == before


def _guard_cases(images, other_images, out, so=None):
    cfg = _cfg(storage_options=so)
    first = extract(images, out, cfg)
    assert first["counts"]["ok"] == N_IMAGES and first["counts"]["shards_run"] == first["counts"]["shards"] >= 2
    assert not fsio.exists(fsio.join(out, outputs.LEASE))             # released at the end
    # the same identity: resumes (nothing to do), also with settings that only change speed
    again = extract(images, out.rstrip("/") + "/", _cfg("extract.batch_size=2", "extract.threads=1",
                                                         storage_options=so))
    assert again["counts"]["shards_skipped"] == first["counts"]["shards"] and again["counts"]["shards_run"] == 0
    refuse = "; nothing was written: pass --overwrite to replace it, or choose another --output"
    _refused_before_any_write(out, lambda: extract(images, out, _cfg("extract.role=query", storage_options=so)),
                              r"holds an extract output \(role 'gallery', this run's is 'query'\)" + refuse)
    _refused_before_any_write(out, lambda: extract(other_images, out, cfg),
                              r"holds an extract output \(input .*, this run's is .*\)" + refuse)
    _refused_before_any_write(out, lambda: extract(images, out, _cfg("preprocess.size_hi=192",
                                                                     storage_options=so)),
                              r"\(other settings \(model/preprocess/extract\)\)" + refuse)
    from retrieval.index.build import build_index
    _refused_before_any_write(out, lambda: build_index([out], out, cfg),
                              r"holds an extract output, not an index output" + refuse)
    # another run writing it now (an Airflow retry overlapping a slow attempt): refused
    live = Lease(fsio.join(out, outputs.LEASE), out, "extract", 30).acquire()
    try:
        _refused_before_any_write(out, lambda: extract(images, out, cfg),
                                  r"is being written by another run \(extract on .*\); its lease expires at")
    finally:
        live.release()
    # a killed run's lease (not renewed) expires and is taken over
    dead = Lease(fsio.join(out, outputs.LEASE), out, "extract", 0.5).acquire()
    dead._stop.set()
    dead._thread.join()
    time.sleep(0.8)
    assert extract(images, out, cfg)["counts"]["shards_run"] == 0
    assert not fsio.exists(fsio.join(out, outputs.LEASE))
    return first


def test_local_refusals_resume_lease_and_overwrite(tmp_path, caplog):
    images, other = _images(tmp_path / "a"), _images(tmp_path / "b")
    out = str(tmp_path / "features")
    first = _guard_cases(images, other, out)
    # a folder that is no stage output (someone's photos): refused, untouched
    _refused_before_any_write(images, lambda: extract(other, images, _cfg()),
                              r"a holds a non-empty folder that is not the output of any retrieval stage")
    # the CLI: one line naming what is there and the flag, exit 2; then --overwrite replaces it
    argv = ["extract", "--input", images, "--output", out, "--role", "query", "--engine", "local",
            "--set", "extract.num_shards=3", "--set", "extract.storage=float32"]
    assert cli.main(argv) == 2
    assert read_manifest(out)["role"] == "gallery"
    assert cli.main([*argv, "--overwrite"]) == 0
    m = read_manifest(out)
    assert m["role"] == "query" and m["counts"]["shards_run"] == m["counts"]["shards"]   # extract.mode=overwrite
    assert m["shards"] != first["shards"]
    assert json.loads(fsio.read_text(fsio.join(out, outputs.IDENTITY)))["role"] == "query"


def test_an_overwrite_that_fails_midway_leaves_an_output_every_reader_refuses(tmp_path, monkeypatch):
    """The documented behaviour: --overwrite writes in place, so the old output is gone as soon as the
    new run starts (its marker first); a failed overwrite leaves no mix that a reader takes as complete."""
    from retrieval.extract import job as job_mod

    images = _images(tmp_path / "a")
    out = str(tmp_path / "features")
    last = max(s["shard"] for s in extract(images, out, _cfg())["shards"])
    real = job_mod.extract_shard

    def second_shard_dies(job, shard, rows):
        if shard == last:
            raise RuntimeError("killed midway")
        return real(job, shard, rows)

    monkeypatch.setattr(job_mod, "extract_shard", second_shard_dies)
    with pytest.raises(RuntimeError, match="killed midway"):
        extract(images, out, _cfg("extract.role=query", "extract.mode=overwrite"))
    with pytest.raises(FileNotFoundError, match="has no _manifest.json"):
        read_manifest(out)
    assert not fsio.exists(fsio.join(out, outputs.LEASE))               # released on failure
    monkeypatch.setattr(job_mod, "extract_shard", real)
    m = extract(images, out, _cfg("extract.role=query"))                 # the new identity resumes
    assert m["role"] == "query" and m["counts"]["shards_run"] == 1
    assert m["counts"]["shards_skipped"] == m["counts"]["shards"] - 1 >= 1


def test_s3_refusals_resume_and_lease(s3, tmp_path):
    fs = s3["fs"]
    so = {"s3": {"endpoint_url": s3["endpoint"], "key": "testing", "secret": "testing"}}
    base = f"{s3['bucket']}/guard"
    for name in ("a", "b"):
        local = _images(tmp_path / name)
        for f in os.listdir(local):
            fs.put(os.path.join(local, f), f"{base}/in/{name}/{f}")
    out = f"{base}/features"
    _guard_cases(f"{base}/in/a", f"{base}/in/b", out, so)
    fs.pipe(f"{base}/stranger/readme.txt", b"not a stage output")
    _refused_before_any_write(f"{base}/stranger", lambda: extract(f"{base}/in/a", f"{base}/stranger",
                                                                  _cfg(storage_options=so)),
                              "stranger holds a non-empty folder that is not the output of any retrieval stage")
    assert not [p for p in fs.find(base) if "/.tmp-" in p or p.endswith(outputs.LEASE)]
