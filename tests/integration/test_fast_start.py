"""``spark.fast_start``: the driver JVM this process starts gets C1 only and a class-data-sharing archive,
made at the first JVM's exit, adopted once its process is gone, used by every later start; and a
session started that way runs jobs (the archive of another JVM or class path is ignored, not an error)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from retrieval.engine import session

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_options_dump_then_adopt_then_use(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    opts = session.fast_start_options("-Dmine=1", cache)
    final = session._archive_path(cache)
    assert opts.split()[:len(session.FAST_START)] == list(session.FAST_START)
    assert f"-XX:ArchiveClassesAtExit={final}.{os.getpid()}.tmp" in opts and opts.endswith("-Dmine=1")
    # a dump of a process that is gone, settled: becomes the archive; a live process's dump is left alone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = time.time() - 2 * session.ARCHIVE_SETTLE_S
    for pid in (int(dead.stdout), os.getppid()):
        with open(f"{final}.{pid}.tmp", "wb") as fh:
            fh.write(b"x" * 10)
        os.utime(f"{final}.{pid}.tmp", (old, old))
    opts = session.fast_start_options("", cache)
    assert f"-XX:SharedArchiveFile={final}" in opts.split() and "ArchiveClassesAtExit" not in opts
    assert os.path.exists(f"{final}.{os.getppid()}.tmp") and not os.path.exists(f"{final}.{int(dead.stdout)}.tmp")
    # a fresh dump (maybe still being written) is not adopted
    os.remove(final)
    with open(f"{final}.{int(dead.stdout)}.tmp", "wb") as fh:
        fh.write(b"y")
    assert "ArchiveClassesAtExit" in session.fast_start_options("", cache) and not os.path.exists(final)


SCRIPT = """
import sys
from retrieval.engine.session import get_spark, stop_spark
spark = get_spark("local[1]", "fast-start-test", {"spark.ui.enabled": "false"}, fast_start=True)
print("jvm", spark.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
print("sum", spark.sparkContext.parallelize(range(10), 2).sum())
stop_spark(spark, join_python_threads=False)
"""


def test_a_session_starts_dumps_and_then_uses_the_archive(tmp_path, monkeypatch):
    env = dict(os.environ, RETRIEVAL_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=ROOT,
               SPARK_LOCAL_IP="127.0.0.1")
    first = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "sum 45" in first.stdout and "TieredStopAtLevel=1" in first.stdout and "ArchiveClassesAtExit" in first.stdout
    dumps = os.listdir(tmp_path / "cache")
    assert len(dumps) == 1 and dumps[0].endswith(".tmp") and os.path.getsize(tmp_path / "cache" / dumps[0]) > 1 << 20
    old = time.time() - 2 * session.ARCHIVE_SETTLE_S
    os.utime(tmp_path / "cache" / dumps[0], (old, old))
    second = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "sum 45" in second.stdout and "SharedArchiveFile=" in second.stdout
    assert "warning" not in second.stderr.lower() or "cds" not in second.stderr.lower()
