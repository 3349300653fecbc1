"""A quiet console (README "Console output and log levels"): a Spark stage run from the command line
shows the project's progress and summary lines, not the JVM's log4j banner and warnings; the
shipped ``retrieval/conf/log4j2.properties`` goes to the driver (and local executors) through
extraJavaOptions merged with the user's, and ``--log-level`` governs the JVM's level too.

Real runs in subprocesses (each its own driver JVM, as a user's run): ``index`` on 2,000
synthetic vectors is the cheapest stage that starts a SparkSession (~10 s each here)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from retrieval import sparkutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT_LINE = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ (DEBUG|INFO|WARNING|ERROR) retrieval[.\w]*: ")
JVM_LINE = re.compile(r"\d\d/\d\d/\d\d \d\d:\d\d:\d\d (TRACE|DEBUG|INFO|WARN|ERROR|FATAL) ")
# printed by the JVM itself at start-up for the --add-modules=jdk.incubator.vector that Spark's
# launcher always adds: no option or log configuration silences it (README)
INCUBATOR = "WARNING: Using incubator modules: jdk.incubator.vector"
BANNERS = ("Using Spark's default log4j profile", "Setting default log level to",
           "To adjust logging level use sc.setLogLevel", "NativeCodeLoader")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    from tests import synthetic

    url = str(tmp_path_factory.mktemp("console") / "features")
    coarse, fine = synthetic.gallery(2000, synthetic.SyntheticSpec(n_clusters=50))
    synthetic.write_feature_output(url, coarse, fine, num_files=2)
    return url


def _env() -> dict:
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               RETRIEVAL_PROGRESS="log")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    for k in ("PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "PYSPARK_SUBMIT_ARGS"):
        env.pop(k, None)
    return env


def _build_index(features: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "retrieval.cli", "index", "--features", features, "--output", out,
           "--master", "local[1]", "--set", "index.quality_queries=50", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)


def _assert_quiet(console: str) -> None:
    lines = [ln for ln in console.splitlines() if ln.strip()]
    for banner in BANNERS:
        assert banner not in console, console[-4000:]
    chatter = [ln for ln in lines if (m := JVM_LINE.match(ln)) and m.group(1) in ("TRACE", "DEBUG", "INFO")]
    chatter += [ln for ln in lines if re.search(r" INFO (py4j|faiss)", ln)]   # libraries' INFO lines
    assert not chatter, chatter[:20]
    # the project's own lines: the stage's start, its steps and its one summary line
    assert any(PROJECT_LINE.match(ln) and "index done:" in ln for ln in lines), console[-4000:]
    assert any(PROJECT_LINE.match(ln) and "spark engine" in ln for ln in lines), console[-4000:]
    # anything else is a JVM warning or error (e.g. a heartbeat timeout on a loaded machine), not
    # a banner, INFO chatter or a library's INFO line
    others = [ln for ln in lines if not (PROJECT_LINE.match(ln) or JVM_LINE.match(ln) or ln == INCUBATOR
                                         or ln.startswith(("{", "}", " ")))]
    assert not others, others


def test_default_run_shows_only_the_projects_lines(features, tmp_path):
    proc = _build_index(features, str(tmp_path / "idx"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_quiet(proc.stderr)
    assert '"ntotal": 2000' in proc.stdout


def test_debug_lets_sparks_info_through_and_keeps_the_users_java_options(features, tmp_path):
    # the user's option comes after the project's, so it wins: the noisy loggers stay at ERROR
    # while --log-level DEBUG lets Spark's INFO lines through
    proc = _build_index(features, str(tmp_path / "idx"), "--log-level", "DEBUG", "--set",
                        "spark.conf={spark.driver.extraJavaOptions: '-Dretrieval.log.noise=ERROR'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    err = proc.stderr
    assert re.search(r"\d\d:\d\d:\d\d INFO SparkContext: Running Spark version", err), err[-4000:]
    assert "Using Spark's default log4j profile" not in err
    assert "Setting default log level to" not in err     # Spark's shell filter would hide INFO
    assert "NativeCodeLoader" not in err                 # the user's -Dretrieval.log.noise=ERROR
    assert any(PROJECT_LINE.match(ln) and "index done:" in ln for ln in err.splitlines())


def test_spark_submit_job_is_quiet_too(features, tmp_path):
    """jobs/*.py under spark-submit: the driver JVM is up before Python runs (on Spark's built-in
    profile); get_spark switches it to the project's file before the SparkContext logs."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "spark-submit"), "--master", "local[1]",
           os.path.join(ROOT, "jobs", "index.py"), "--features", features,
           "--output", str(tmp_path / "idx"), "--set", "index.quality_queries=50"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=180)
    # spark-submit's PythonRunner copies the Python process's stderr to its stdout
    console = proc.stderr + proc.stdout
    assert proc.returncode == 0, console[-4000:]
    _assert_quiet(console)


def test_java_options_merge_with_the_users():
    path = sparkutil.log4j2_file()
    assert os.path.isfile(path)
    opts = sparkutil.java_logging_options("INFO", "-XX:+UseG1GC -Dretrieval.log.level=DEBUG")
    assert opts.startswith(f"-Dlog4j2.configurationFile={path} -Dretrieval.log.level=WARN ")
    assert opts.endswith("-XX:+UseG1GC -Dretrieval.log.level=DEBUG")       # theirs kept, and last
    own = "-Dlog4j2.configurationFile=/etc/spark/log4j2.properties -Xss4m"
    assert sparkutil.java_logging_options("DEBUG", own) == own                # their file stays theirs
    assert sparkutil.jvm_levels("DEBUG") == ("INFO", "INFO")
    assert sparkutil.jvm_levels("info") == ("WARN", "ERROR")
    assert sparkutil.jvm_levels("ERROR") == ("ERROR", "ERROR")
    assert sparkutil.jvm_levels(None) == ("WARN", "ERROR")


def test_spark_defaults_are_merged(tmp_path, monkeypatch):
    (tmp_path / "spark-defaults.conf").write_text(
        "# comment\nspark.driver.extraJavaOptions   -Dfoo=1 -Dbar=2\nspark.executor.memory=4g\n")
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path))
    d = sparkutil._spark_defaults()
    assert d["spark.driver.extraJavaOptions"] == "-Dfoo=1 -Dbar=2" and d["spark.executor.memory"] == "4g"
