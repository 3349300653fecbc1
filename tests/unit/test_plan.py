import pytest

from retrieval.cli import main
from retrieval.plan import Cluster, index_params, parse_memory, plan


def test_plan_scales_with_images_and_cluster():
    small = plan(10_000_000, Cluster(executors=10))
    big = plan(1_000_000_000, Cluster(executors=10))
    more = plan(1_000_000_000, Cluster(executors=100))
    assert big["index_shards"] == 100 and small["index_shards"] == 1
    assert big["stages"]["extract"]["wall"] == pytest.approx(100 * small["stages"]["extract"]["wall"])
    assert more["stages"]["extract"]["wall"] == pytest.approx(big["stages"]["extract"]["wall"] / 10)
    assert big["stages"]["extract"]["storage"] == pytest.approx(1e9 * 1261)
    gpu = plan(1_000_000_000, Cluster(executors=10, gpus=8))
    assert "ASSUMED" in gpu["stages"]["extract"]["basis"]
    assert index_params(1_000_000_000)["nlist"] == 131072


def test_plan_warns_when_a_task_does_not_fit():
    p = plan(1_000_000_000, Cluster(executors=10, executor_memory_gb=1, executor_cores=4))
    assert any(w.startswith("build-index") for w in p["warnings"])


def test_plan_cli(capsys):
    assert main(["plan", "--images", "1e9", "--executors", "50", "--executor-memory", "32g", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "Plan for 1,000,000,000 gallery images" in out and "IVF131072,PQ16" in out
    with pytest.raises(ValueError):
        parse_memory("lots")
