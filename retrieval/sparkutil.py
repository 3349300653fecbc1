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
