"""Shared fixtures: one local[2] SparkSession per test session, the sample photos, small models."""
from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one torch thread is faster than two on a shared 2-core machine (a module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def verified_record_dir(tmp_path_factory):
    """The verified-once record (``io.verified_record: auto``) of the tests' runs: in a temporary
    folder, not the user's ~/.cache."""
    os.environ["RETRIEVAL_CACHE_DIR"] = str(tmp_path_factory.mktemp("retrieval-cache"))
    yield os.environ["RETRIEVAL_CACHE_DIR"]


@pytest.fixture(scope="session")
def spark():
    from retrieval.engine.session import get_spark

    # local[2,4]: two cores, and tasks are retried up to 4 times (as on a cluster)
    session = get_spark("local[2,4]", "retrieval-tests", {"spark.ui.enabled": "false",
                                                          "spark.sql.shuffle.partitions": "4"})
    yield session
    session.stop()


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """The bundled sample: real photos as gallery, generated copies as queries, truth CSV."""
    from retrieval.sample import make_sample

    return make_sample(str(tmp_path_factory.mktemp("sample")), seed=0)


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server (moto) on 127.0.0.1, wired into fsspec for this process and for Spark's
    Python workers (they inherit the environment); stopped at the end of the session."""
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("retrieval-test")
    try:
        yield {"endpoint": endpoint, "bucket": "s3://retrieval-test", "fs": fs}
    finally:
        fsspec.config.conf.get("s3", {}).pop("endpoint_url", None)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


_EXIT_STATUS = {"code": None}


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """The summary is printed; leave without interpreter teardown, where pyarrow's and torch's native
    thread pools can abort a finished run (apache/arrow#50482) and turn a pass into exit 134."""
    if _EXIT_STATUS["code"] is not None and os.environ.get("RETRIEVAL_HARD_EXIT", "1") == "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS["code"])
