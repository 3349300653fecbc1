"""The engine every stage runs on: this process (:class:`LocalEngine`) or Spark tasks
(:class:`SparkEngine`). One interface, two implementations calling the same task functions.

A stage writes its work as module-level task functions over small picklable work units (Spark
ships them by reference) and hands them to the engine:

- :meth:`Engine.map`: one task per item, the results in item order;
- :meth:`Engine.map_reduce`: one task per item, the results merged pairwise (Spark: ``treeReduce``);
- :meth:`Engine.map_batches`: items in ``parts`` contiguous batches, a task yields per batch;
- :meth:`Engine.broadcast`: a read-only value every task sees (locally: the value itself);
- :meth:`Engine.run`: a stage's own Spark plan (the search's shuffles, the extraction's
  ``mapInArrow``, the index's id window), written against :attr:`SparkEngine.spark`, under the
  same progress lines and error translation. Stages choose that plan with :attr:`Engine.is_spark`;
  the local engine runs the same task bodies in loops;
- :meth:`Engine.run_torch`: data-parallel torch training (Spark: ``TorchDistributor``; locally one
  process).

Errors: a task's error of a class registered with :func:`task_error` (bad input, a broken
index, a missing file: errors whose message says what is wrong) comes back on the driver as the
same class with its message, not buried in a Java stack trace.

Task side (inside a task on either engine): :func:`task_attempt`, :func:`in_task`,
:func:`task_threads`, :func:`task_device`.

Spark and :mod:`retrieval.sparkutil` (session creation, JVM logging) are imported here only.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

# class name -> class, of the errors a task raises that the driver re-raises as themselves
TASK_ERRORS: dict[str, type[Exception]] = {}


def task_error(cls: type[Exception]) -> type[Exception]:
    """Class decorator: this error's message is clear, so a Spark task's instance is re-raised on
    the driver as the same class and message (:meth:`Engine.run`)."""
    TASK_ERRORS[cls.__name__] = cls
    return cls


def translate(exc: BaseException) -> BaseException | None:
    """The registered task error that ``exc`` (a Spark failure's Java/Python trace) carries, or None."""
    if type(exc).__name__ in TASK_ERRORS or not TASK_ERRORS:
        return None
    names = "|".join(sorted(map(re.escape, TASK_ERRORS), key=len, reverse=True))
    m = re.search(rf"\b({names}): ([^\n]+)", str(exc))
    return TASK_ERRORS[m.group(1)](m.group(2)) if m else None


class Shared:
    """A broadcast value: ``.value`` in every task, ``destroy()`` when the stage is done."""

    def __init__(self, value: Any, handle: Any = None) -> None:
        self._value, self._handle = value, handle

    @property
    def value(self) -> Any:
        return self._handle.value if self._handle is not None else self._value

    def __getstate__(self) -> dict:        # a Spark broadcast travels as its handle, not its bytes
        return {"_value": None if self._handle is not None else self._value, "_handle": self._handle}

    def destroy(self) -> None:
        if self._handle is not None:
            self._handle.destroy()


class Engine:
    """What a stage needs from where it runs (see the module doc)."""

    name: ClassVar[str] = "engine"
    is_spark: ClassVar[bool] = False
    spark: Any = None

    @property
    def parallelism(self) -> int:
        raise NotImplementedError

    def map(self, fn: Callable, items: Sequence, label: str, every: float = 10.0, threads: int = 1) -> list:
        raise NotImplementedError

    def map_reduce(self, fn: Callable, items: Sequence, merge: Callable, label: str, every: float = 10.0) -> Any:
        raise NotImplementedError

    def map_batches(self, fn: Callable[[Iterable], Iterable], items: Sequence, parts: int, label: str,
                    every: float = 10.0) -> list:
        raise NotImplementedError

    def broadcast(self, value: Any) -> Shared:
        return Shared(value)

    def run(self, label: str, total: int, action: Callable[[], Any], every: float = 10.0) -> Any:
        return action()

    def run_torch(self, fn: Callable, processes: int, arg: Any, local_mode: bool = True,
                  use_gpu: bool = False) -> Any:
        raise NotImplementedError


class LocalEngine(Engine):
    """The task functions in this process, in order (``threads > 1``: a thread pool, for I/O-bound
    tasks such as hashing files). No JVM."""

    name = "local"

    @property
    def parallelism(self) -> int:
        return max(1, os.cpu_count() or 1)

    def map(self, fn, items, label, every=10.0, threads=1):
        if threads > 1 and len(items) > 1:
            with ThreadPoolExecutor(min(threads, len(items))) as pool:
                return list(pool.map(fn, items))
        return [fn(x) for x in items]

    def map_reduce(self, fn, items, merge, label, every=10.0):
        return functools.reduce(merge, (fn(x) for x in items))

    def map_batches(self, fn, items, parts, label, every=10.0):
        return list(fn(iter(items)))

    def run_torch(self, fn, processes, arg, local_mode=True, use_gpu=False):
        if processes > 1:
            raise ValueError(f"train.processes={processes} runs through Spark's TorchDistributor: use --engine "
                             "spark (or train.processes=1 with --engine local)")
        return fn(arg)


class SparkEngine(Engine):
    """Spark tasks of ``spark`` (a SparkSession), one per work unit, with the driver's progress lines
    (tasks done, rate, ETA) every ``every`` seconds."""

    name = "spark"
    is_spark = True

    def __init__(self, spark: Any) -> None:
        self.spark = spark

    @property
    def parallelism(self) -> int:
        return int(self.spark.sparkContext.defaultParallelism)

    def run(self, label, total, action, every=10.0):
        from retrieval.sparkutil import ProgressMonitor

        try:
            with ProgressMonitor(self.spark, label, total_tasks=total, every=every):
                return action()
        except Exception as exc:
            clear = translate(exc)
            if clear is not None:
                raise clear from None
            raise

    def _rdd(self, items: Sequence, parts: int):
        return self.spark.sparkContext.parallelize(list(items), max(1, parts))

    def map(self, fn, items, label, every=10.0, threads=1):
        if not items:
            return []
        rdd = self._rdd(items, len(items)).map(fn)
        return self.run(label, len(items), rdd.collect, every)

    def map_reduce(self, fn, items, merge, label, every=10.0):
        rdd = self._rdd(items, len(items)).map(fn)
        return self.run(label, len(items), lambda: rdd.treeReduce(merge, depth=2), every)

    def map_batches(self, fn, items, parts, label, every=10.0):
        rdd = self._rdd(items, parts).mapPartitions(fn)
        return self.run(label, parts, rdd.collect, every)

    def broadcast(self, value):
        return Shared(None, self.spark.sparkContext.broadcast(value))

    def run_torch(self, fn, processes, arg, local_mode=True, use_gpu=False):
        from pyspark.ml.torch.distributor import TorchDistributor

        distributor = TorchDistributor(num_processes=processes, local_mode=local_mode, use_gpu=use_gpu)
        return self.run("train", processes, lambda: distributor.run(fn, arg))


LOCAL = LocalEngine()


def as_engine(engine: Any) -> Engine:
    """An :class:`Engine` for what a caller passed: an engine, a SparkSession, or None (local)."""
    if engine is None:
        return LOCAL
    if isinstance(engine, Engine):
        return engine
    if hasattr(engine, "sparkContext"):
        return SparkEngine(engine)
    raise TypeError(f"not an engine or a SparkSession: {engine!r}")


@contextlib.contextmanager
def open_engine(kind: str, cfg: Any, master: str | None = None, log_level: str | None = None,
                exiting: bool = False) -> Iterator[Engine]:
    """The CLI's engine: ``local``, or ``spark`` with a session from the config (``spark.*``) that is
    stopped afterwards, unless spark-submit owns it. ``master``: the ``--master`` given (None: keep
    spark-submit's, else ``spark.master``). ``exiting``: the process ends right after, so the stop
    does not wait for Python-side server threads (:func:`retrieval.sparkutil.stop_spark`)."""
    if kind != "spark":
        yield LOCAL
        return
    from retrieval.sparkutil import get_spark, stop_spark

    submitted = bool(os.environ.get("PYSPARK_GATEWAY_PORT"))
    resolved = master if master is not None else ("" if submitted else cfg["spark.master"])
    spark = get_spark(resolved, cfg["spark.app_name"], cfg["spark.conf"], log_level=log_level)
    try:
        yield SparkEngine(spark)
    finally:
        if not submitted:
            stop_spark(spark, join_python_threads=not exiting)


# ---------------------------------------------------------------------------------------------
# task side
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
