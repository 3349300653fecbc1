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
