"""Spark session creation and task-side helpers (imported lazily: the local path never starts a JVM)."""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping


def get_spark(master: str | None, app_name: str = "retrieval", conf: Mapping[str, str] | None = None):
    """A SparkSession; an empty ``master`` keeps what spark-submit set."""
    from pyspark.sql import SparkSession

    if master and master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    settings = {"spark.sql.execution.arrow.pyspark.enabled": "true",
                "spark.ui.showConsoleProgress": "false"}
    settings.update(conf or {})
    for k, v in settings.items():
        builder = builder.config(k, str(v))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def stop_spark(spark, join_python_threads: bool = True) -> None:
    """Stop the session: the JVM side as always (executors, shuffle and temp files, event log).
    With ``join_python_threads=False`` (the CLI, whose process exits right after) the driver's
    accumulator-update server, a Python thread whose handler polls its socket on a 1 s timer, is
    left to the process exit instead of being joined: joining it costs up to a second of a job's
    wall time for nothing (measured 0.9-1.0 s of ``spark.stop()``, tests/bench/bench_search.py)."""
    sc = spark.sparkContext
    server = getattr(sc, "_accumulatorServer", None)
    if not join_python_threads and server is not None:
        server.server_shutdown = True       # its handlers end at their next poll, if ever
        sc._accumulatorServer = None        # pyspark's stop() skips the join
    spark.stop()


def task_threads(configured: int = 0) -> int:
    """Torch threads for this task: the configured number, else the task's cores (Spark), else all."""
    if configured > 0:
        return configured
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is not None:
            return max(1, int(ctx.cpus()))
    except Exception:
        pass
    return max(1, os.cpu_count() or 1)


def task_device(preference: str = "auto") -> str:
    """``cuda:<address>`` when Spark assigned this task a GPU (or cuda is forced), else ``cpu``."""
    import torch

    if preference == "cpu":
        return "cpu"
    address: Any = None
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is not None and "gpu" in ctx.resources():
            address = ctx.resources()["gpu"].addresses[0]
    except Exception:
        address = None
    if torch.cuda.is_available() and (address is not None or preference == "cuda"):
        return f"cuda:{address if address is not None else 0}"
    if preference == "cuda":
        raise RuntimeError("model.device=cuda but no CUDA device is available")
    return "cpu"


class ProgressMonitor:
    """Driver-side progress of a Spark action: tasks done / total, rate and ETA, logged every
    ``every`` seconds from the status tracker (tasks log their own per-item progress)."""

    def __init__(self, spark, label: str, total_tasks: int, every: float = 10.0) -> None:
        import threading

        self.spark, self.label, self.total, self.every = spark, label, total_tasks, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import logging
        import time

        log = logging.getLogger("retrieval.progress")
        tracker = self.spark.sparkContext.statusTracker()
        start = time.monotonic()
        while not self._stop.wait(self.every):
            done = 0
            for sid in tracker.getActiveStageIds():
                info = tracker.getStageInfo(sid)
                if info is not None:
                    done += info.numCompletedTasks
            rate = done / max(time.monotonic() - start, 1e-9)
            eta = f", ETA {(self.total - done) / rate:.0f}s" if rate > 0 else ""
            log.info("%s: %d/%d tasks done, %.2f tasks/s%s", self.label, done, self.total, rate, eta)

    def __enter__(self) -> "ProgressMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
