"""Adding a stage is its own package plus one line: a toy stage from a test package, registered
through ``$RETRIEVAL_STAGES``, runs through the real CLI on both engines (local, and Spark in a
subprocess: a JVM of its own), with its config section, checks, help and output contract."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from retrieval import cli, config, outputs, registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY = "tests.toy_stage.stage"


@pytest.fixture
def toy(monkeypatch, tmp_path):
    monkeypatch.setenv(registry.PLUGINS_ENV, TOY)
    numbers = tmp_path / "numbers.txt"
    numbers.write_text("1 2 3\n4\n")
    return str(numbers)


def _rows(out: str) -> list[tuple[int, int]]:
    table = pq.read_table(os.path.join(out, "part-00000.parquet"))
    return sorted(zip(table["n"].to_pylist(), table["value"].to_pylist()))


def test_the_toy_stage_is_registered_with_its_section_and_checks(toy, capsys):
    assert "toy" in registry.stages() and list(registry.stages())[-1] == "toy"
    cfg = registry.load_config(sets=["toy.factor=5"])
    assert cfg["toy.factor"] == 5 and cfg["extract.batch_size"] > 0
    with pytest.raises(config.ConfigError, match="'toy.factor' = 0: must be > 0"):
        registry.load_config(sets=["toy.factor=0"])
    assert "retrieval toy --input FILE --output URL" in registry.stage_table()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "squares of numbers" in capsys.readouterr().out


def test_the_toy_stage_runs_through_the_cli_on_the_local_engine(toy, tmp_path, capsys):
    out = str(tmp_path / "local")
    assert cli.main(["toy", "--input", toy, "--output", out, "--engine", "local", "--set", "toy.factor=3"]) == 0
    assert json.loads(capsys.readouterr().out) == {"output": out, "rows": 4, "engine": "local"}
    assert _rows(out) == [(1, 3), (2, 12), (3, 27), (4, 48)]
    m = outputs.read(out, "toy")
    assert m["config"]["toy"] == {"factor": 3} and m["files"][0]["file"] == "part-00000.parquet"
    # a bad value of its own section is a clear configuration error, before any work
    rc = cli.main(["toy", "--input", toy, "--output", str(tmp_path / "bad"), "--engine", "local",
                   "--set", "toy.factor=-1"])
    assert rc == 2 and "toy.factor" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")


def test_the_toy_stage_runs_through_the_cli_on_spark(toy, tmp_path):
    out = str(tmp_path / "spark")
    env = dict(os.environ, PYTHONPATH=ROOT, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    proc = subprocess.run([sys.executable, "-m", "retrieval.cli", "toy", "--input", toy, "--output", out,
                           "--master", "local[2]"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"output": out, "rows": 4, "engine": "spark"}
    assert _rows(out) == [(1, 2), (2, 8), (3, 18), (4, 32)]
    table = pq.read_table(os.path.join(out, "part-00000.parquet"))
    assert all(table["in_task"].to_pylist())     # each number ran in a Spark task
    # its job file, generated from the registry, is the same thin wrapper as the built-in stages'
    assert "jobs/toy.py --input FILE --output URL" in registry.job_file_text(registry.get("toy"))
