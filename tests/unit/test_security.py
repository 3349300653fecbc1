"""Hostile input: nothing from input data can make a job write outside its output root or run code."""
import ast
import os
import pathlib

import pytest

from retrieval import fsio

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "s3://bucket/x", "C:\\x", "..", "", "a\x00b"])
def test_safe_relpath_refuses_escapes(bad):
    with pytest.raises(fsio.UnsafePathError):
        fsio.safe_relpath(bad)


def test_safe_relpath_normalises_harmless_paths():
    assert fsio.safe_relpath("a/./b//c.jpg") == "a/b/c.jpg"
    assert fsio.safe_relpath("a/../b.jpg") == "b.jpg"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_no_unpickling_of_input_files_anywhere_in_the_library():
    """torch.load only with weights_only=True; no pickle/np.load(allow_pickle)/pandas.read_pickle."""
    offenders = []
    for path in (ROOT / "retrieval").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree):
            name = ast.unparse(call.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name.endswith("torch.load") and kwargs.get("weights_only") != "True":
                offenders.append(f"{path}:{call.lineno} torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "cloudpickle.loads", "pd.read_pickle", "pandas.read_pickle"):
                offenders.append(f"{path}:{call.lineno} {name}")
            if name.endswith("np.load") and kwargs.get("allow_pickle") == "True":
                offenders.append(f"{path}:{call.lineno} np.load(allow_pickle=True)")
    assert not offenders, offenders


def test_hostile_ids_in_a_manifest_cannot_write_outside_the_output(tmp_path):
    from PIL import Image

    from retrieval import config
    from retrieval.extract.job import extract, read_features

    img = tmp_path / "in" / "a.jpg"
    img.parent.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(img)
    ids = ["../../escape.jpg", "/abs/escape.jpg", "s3://bucket/escape.jpg", "<img src=x onerror=alert(1)>"]
    man = tmp_path / "m.csv"
    man.write_text("image_id,uri\n" + "".join(f"\"{i}\",{img}\n" for i in ids) + f"etc,/etc/passwd\n")
    out = tmp_path / "deep" / "out"
    before = {p for p in tmp_path.rglob("*")}
    m = extract(str(man), str(out), config.load(sets=["extract.num_shards=2"]))
    assert m["counts"] == {**m["counts"], "inputs": 5, "ok": 4, "errors": 1}
    assert sorted(read_features(str(out))["image_id"].to_pylist()) == sorted(ids)   # ids are data, not paths
    created = {p for p in tmp_path.rglob("*")} - before
    allowed = {out, out.parent}   # the output root and the folder it was created in
    assert created and all(out in p.parents or p in allowed for p in created), created - allowed
    assert not os.path.exists("/abs") and not (tmp_path.parent / "escape.jpg").exists()
