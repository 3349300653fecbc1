"""The task side, on either engine: is this a Spark task, which attempt, how many threads, which device."""
from __future__ import annotations

import os
import sys
from typing import Any


def _task_context() -> Any:
    if "pyspark" not in sys.modules:       # no Spark task in a process that never imported pyspark
        return None
    try:
        from pyspark import TaskContext

        return TaskContext.get()
    except Exception:
        return None


def in_task() -> bool:
    """True inside a Spark task."""
    return _task_context() is not None


def task_attempt() -> int:
    """The attempt number of the running Spark task (0 for the first; 0 outside Spark), for the
    stats a task records, so a test can see that a retry really happened."""
    ctx = _task_context()
    return int(ctx.attemptNumber()) if ctx is not None else 0


def task_threads(configured: int | str = "auto") -> int:
    """Threads for this task: the configured number, else (``auto``) the task's cores (Spark), else all."""
    if configured != "auto" and configured > 0:
        return configured
    ctx = _task_context()
    if ctx is not None:
        try:
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
    ctx = _task_context()
    try:
        if ctx is not None and "gpu" in ctx.resources():
            address = ctx.resources()["gpu"].addresses[0]
    except Exception:
        address = None
    if torch.cuda.is_available() and (address is not None or preference == "cuda"):
        return f"cuda:{address if address is not None else 0}"
    if preference == "cuda":
        raise RuntimeError("model.device=cuda but no CUDA device is available")
    return "cpu"
