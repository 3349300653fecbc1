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

from retrieval.engine import session

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT_LINE = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ (DEBUG|INFO|WARNING|ERROR) retrieval[.\w]*: ")
JVM_LINE = re.compile(r"\d\d/\d\d/\d\d \d\d:\d\d:\d\d (TRACE|DEBUG|INFO|WARN|ERROR|FATAL) ")
# printed by the JVM itself at start-up for the --add-modules=jdk.incubator.vector that Spark's
# launcher always adds: no option or log configuration silences it; a driver JVM the project starts
# has its stderr filtered of it (session.jvm_stderr_filtered), spark-submit's JVM is up before
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


def _assert_quiet(console: str, jvm_started_here: bool = True) -> None:
    lines = [ln for ln in console.splitlines() if ln.strip()]
    assert not jvm_started_here or INCUBATOR not in console, console[-4000:]
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
    assert INCUBATOR not in err
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
    _assert_quiet(console, jvm_started_here=False)


def test_java_options_merge_with_the_users():
    path = session.log4j2_file()
    assert os.path.isfile(path)
    opts = session.java_logging_options("INFO", "-XX:+UseG1GC -Dretrieval.log.level=DEBUG")
    assert opts.startswith(f"-Dlog4j2.configurationFile={path} -Dretrieval.log.level=WARN ")
    assert opts.endswith("-XX:+UseG1GC -Dretrieval.log.level=DEBUG")       # theirs kept, and last
    own = "-Dlog4j2.configurationFile=/etc/spark/log4j2.properties -Xss4m"
    assert session.java_logging_options("DEBUG", own) == own                # their file stays theirs
    assert session.jvm_levels("DEBUG") == ("INFO", "INFO")
    assert session.jvm_levels("info") == ("WARN", "ERROR")
    assert session.jvm_levels("ERROR") == ("ERROR", "ERROR")
    assert session.jvm_levels(None) == ("WARN", "ERROR")


def test_spark_defaults_are_merged(tmp_path, monkeypatch):
    (tmp_path / "spark-defaults.conf").write_text(
        "# comment\nspark.driver.extraJavaOptions   -Dfoo=1 -Dbar=2\nspark.executor.memory=4g\n")
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path))
    d = session._spark_defaults()
    assert d["spark.driver.extraJavaOptions"] == "-Dfoo=1 -Dbar=2" and d["spark.executor.memory"] == "4g"


# ---------------------------------------------------------------------------------------------
# third-party output (faiss prints from C++ to fd 2) goes to the run's log file, not the console
CLUSTERING = re.compile(r"WARNING clustering \d+ points to \d+ centroids: please provide at least \d+ training points")


def test_faiss_warnings_go_to_the_log_file_not_the_console(features, tmp_path):
    """64 IVF cells for 2,000 vectors: faiss warns (k-means and the PQ training), on fd 2."""
    log_file = tmp_path / "logs" / "index.log"
    cmd = [sys.executable, "-m", "retrieval.cli", "index", "--features", features, "--output", str(tmp_path / "idx"),
           "--engine", "local", "--set", "index.quality_queries=50", "--set", "index.nlist=64"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(_env(), RETRIEVAL_LOG_FILE=str(log_file)), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "clustering" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr[-4000:]
    logged = log_file.read_text()
    thirdparty = [ln for ln in logged.splitlines() if " WARNING retrieval.thirdparty: faiss: " in ln]
    assert thirdparty and all(CLUSTERING.search(ln) for ln in thirdparty), logged[-4000:]
    assert "index done:" in logged                      # the run's own lines are in the file too
    assert f"third-party output ({len(thirdparty)} lines, e.g. faiss warnings) is in the log file {log_file}" \
        in proc.stderr


SPARK_TASK_SCRIPT = """
import sys
from retrieval.engine.session import get_spark
from retrieval.engine import SparkEngine
from tests.integration.test_console import kmeans_task
spark = get_spark("local[1]", "capture-test", {"spark.ui.enabled": "false"})
print(SparkEngine(spark).map(kmeans_task, [0, 1], "kmeans"), flush=True)
spark.stop()
"""


def kmeans_task(seed: int) -> int:
    """A Spark task that trains faiss k-means on too few points, inside the capture."""
    import faiss
    import numpy as np

    from retrieval.console import native_output

    x = np.random.default_rng(seed).standard_normal((30, 8)).astype(np.float32)
    with native_output("faiss"):
        faiss.Kmeans(8, 16, niter=2, seed=1).train(x)
    return seed


def test_faiss_warnings_in_spark_tasks_go_to_the_log_file(tmp_path):
    """Spark's local Python workers inherit RETRIEVAL_LOG_FILE and append their third-party lines."""
    log_file = tmp_path / "run.log"
    env = dict(_env(), RETRIEVAL_LOG_FILE=str(log_file), PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SPARK_TASK_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0 and "[0, 1]" in proc.stdout, proc.stderr[-4000:]
    assert "clustering" not in proc.stderr, proc.stderr[-4000:]
    lines = [ln for ln in log_file.read_text().splitlines() if CLUSTERING.search(ln)]
    assert len(lines) == 2 and all(re.search(r" WARNING retrieval\.thirdparty\[\d+\]: faiss: ", ln) for ln in lines)


# ---------------------------------------------------------------------------------------------
# one progress bar per stage on a terminal, plain lines elsewhere (local engine, from the CLI)
def _index_local(features: str, out: str, stderr, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "retrieval.cli", "index", "--features", features, "--output", out,
           "--engine", "local", "--set", "index.quality_queries=50", "--set", "index.vectors_per_shard=500",
           "--set", "index.progress_seconds=0.001"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def test_local_stage_draws_one_bar_on_a_terminal_and_lines_otherwise(features, tmp_path):
    import pty

    env = {k: v for k, v in _env().items() if k != "RETRIEVAL_PROGRESS"}
    master, slave = pty.openpty()
    proc = _index_local(features, str(tmp_path / "tty"), slave, env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:                       # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=180) == 0
    tty = b"".join(chunks).decode(errors="replace")
    frames = [f.strip() for f in re.split(r"[\r\n]", tty) if f.strip() and not PROJECT_LINE.match(f.strip())]
    # the 4 shards of 500 vectors make ONE bar in vectors (no bar or line per shard)
    shard_bars = [f for f in frames if f.startswith("index shards:")]
    assert shard_bars and shard_bars[-1].startswith("index shards: 100%|") and "2000/2000 vectors [" in shard_bars[-1]
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, [\d.]+ vectors/s\]$", shard_bars[-1]), shard_bars[-1]
    assert not any(re.match(r"index shard \d", f) for f in frames) and "index shard 0" not in tty
    assert all(f.startswith(("index scan:", "index shards:")) for f in frames), frames   # bars only

    proc = _index_local(features, str(tmp_path / "log"), subprocess.PIPE, env)    # not a terminal
    err = proc.communicate(timeout=180)[1].decode()
    assert proc.returncode == 0, err[-3000:]
    assert "\r" not in err and "%|" not in err
    lines = [ln.split(": ", 1)[1] for ln in err.splitlines() if " INFO retrieval.progress: " in ln]
    shard_lines = [ln for ln in lines if ln.startswith("index shards: ")]
    assert len(shard_lines) >= 4, lines
    for n, ln in zip((500, 1000, 1500, 2000), shard_lines):     # count, share, rate, ETA
        assert ln.startswith(f"index shards: {n}/2000 vectors ({n / 20:.1f}%), ") and " vectors/s, ETA " in ln, ln
    assert any(ln.startswith("done: index shards: 2000/2000 vectors (100.0%)") for ln in lines)
    assert not any(ln.startswith(("index shard 0", "done: index shard 0")) for ln in lines)
