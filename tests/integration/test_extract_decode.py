"""The extraction job with the fast decode path (``preprocess.decoder: fast``, decode threads ahead of
the forward) on both engines: the features of the Pillow path within tolerance, the same rows and error
rows, and decode threads that change nothing but the speed."""
import glob
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval import config
from retrieval.extract.job import extract, read_features
from retrieval.schema import coarse_matrix, fine_matrix
from tests.imagezoo import make_zoo


def cfg(**sets):
    items = [f"{k}={v}" for k, v in {"extract.num_shards": 2, "extract.batch_size": 8,
                                      "extract.storage": "float32", "extract.progress_seconds": 1, **sets}.items()]
    return config.load(sets=items)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, sample):
    """The sample's real photos (JPEG, PNG, WebP) plus the odd and broken files of the zoo."""
    d = tmp_path_factory.mktemp("decode_in")
    shutil.copytree(sample["gallery"], str(d / "photos"))
    make_zoo(str(d / "zoo"))
    return str(d)


@pytest.fixture(scope="module")
def pillow_local(photos, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pil") / "out")
    extract(photos, out, cfg(**{"preprocess.decoder": "pillow"}))
    return out


@pytest.fixture(scope="module")
def fast_local(photos, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fast") / "out")
    m = extract(photos, out, cfg())
    assert m["config"]["preprocess"]["decoder"] == "fast"
    return out


def _errors(out: str) -> list[tuple[str, str]]:
    t = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(out + "/errors/*.parquet"))])
    return sorted(zip(t["image_id"].to_pylist(), t["error"].to_pylist()))


def _cosines(a, b) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_fast_features_are_within_tolerance_of_pillows(pillow_local, fast_local):
    """Same rows and error rows; descriptors of real photos: median cosine >= 0.99999, every one >= 0.998
    (the resize differs by at most 2 grey levels), and every image's nearest other image unchanged."""
    a, b = read_features(pillow_local), read_features(fast_local)
    assert a["image_id"].to_pylist() == b["image_id"].to_pylist() and a.num_rows > 40
    real = np.array([i.startswith("photos") for i in a["image_id"].to_pylist()])   # not the zoo's copies of one picture
    assert real.sum() >= 40
    for get in (coarse_matrix, fine_matrix):
        x, y = get(a), get(b)
        cos = _cosines(x, y)
        assert np.median(cos) >= 0.99999 and cos.min() >= 0.998, (get.__name__, np.median(cos), cos.min())
        x, y = x[real], y[real]
        sx, sy = x @ x.T, y @ y.T
        np.fill_diagonal(sx, -9)
        np.fill_diagonal(sy, -9)
        assert (sx.argmax(1) == sy.argmax(1)).all()
    assert _errors(pillow_local) == _errors(fast_local) and len(_errors(fast_local)) >= 8


def test_decode_threads_change_nothing_but_speed(photos, fast_local, tmp_path):
    inline = str(tmp_path / "inline")
    m = extract(photos, inline, cfg(**{"extract.decode_threads": 0}))
    assert m["counts"]["ok"] == read_features(fast_local).num_rows and m["counts"]["errors"] >= 8
    a, b = read_features(inline), read_features(fast_local)
    assert a.equals(b)
    _assert_task_costs(m)


def _assert_task_costs(m: dict) -> None:
    """Each shard records its task's CPU seconds (every thread) and its model setup (bench_decode.py)."""
    for s in m["shards"]:
        assert s["cpu_s"] > 0 and s["setup_s"] >= 0 and s["seconds"] >= s["setup_s"], s


@pytest.mark.parametrize("decoder", ["fast", "pillow"])
def test_spark_gives_the_local_rows(spark, photos, pillow_local, fast_local, tmp_path, decoder):
    out = str(tmp_path / decoder)
    m = extract(photos, out, cfg(**{"preprocess.decoder": decoder, "extract.decode_threads": 2}), spark)
    assert m["engine"] == "spark"
    _assert_task_costs(m)
    a, b = read_features(fast_local if decoder == "fast" else pillow_local), read_features(out)
    assert a["image_id"].to_pylist() == b["image_id"].to_pylist()
    assert np.abs(fine_matrix(a) - fine_matrix(b)).max() < 1e-4
    assert np.abs(coarse_matrix(a) - coarse_matrix(b)).max() < 1e-4


def test_an_output_of_the_pillow_path_resumes_with_the_fast_one(photos, pillow_local):
    """The decoder is not part of an output's identity nor of its shards' fingerprints (rows within
    tolerance, as for model.runtime): an incremental run skips the finished shards, no --overwrite."""
    before = read_features(pillow_local)
    m = extract(photos, pillow_local, cfg())
    assert m["counts"]["shards_skipped"] == m["counts"]["shards"] == 2 and m["counts"]["shards_run"] == 0
    assert read_features(pillow_local).equals(before)
