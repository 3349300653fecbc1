"""Shared fixtures: one local[2] SparkSession per test session, the sample photos, small models."""
from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def spark():
    from retrieval.sparkutil import get_spark

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
