"""The Spark session helpers of the Spark engine (:mod:`retrieval.engine`; no module outside the
engine package imports them): session creation with the project's JVM logging, its stop, and the
driver's progress lines."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Iterator, Mapping


# --log-level (Python's names) -> the level of Spark's JVM loggers: the project's INFO progress and
# summary lines come with Spark at WARN; DEBUG lets Spark's INFO lines through (Spark's own DEBUG is
# thousands of lines per job: ask for it with -Dretrieval.log.level=DEBUG in extraJavaOptions)
JVM_LEVELS = {"DEBUG": "INFO", "INFO": "WARN", "WARNING": "WARN", "WARN": "WARN", "ERROR": "ERROR",
              "CRITICAL": "FATAL", "FATAL": "FATAL"}
LOG4J2_SYSPROPS = ("log4j2.configurationFile", "log4j.configurationFile")
JAVA_OPTION_KEYS = ("spark.driver.extraJavaOptions", "spark.executor.extraJavaOptions")
# printed by the JVM's module bootstrap (System.err, before any logging) for the
# --add-modules=jdk.incubator.vector that Spark 4's launcher always adds: no JVM option removes it
INCUBATOR_WARNING = b"WARNING: Using incubator modules: jdk.incubator.vector"


def log4j2_file() -> str:
    """The shipped log4j2 configuration (package data): ``retrieval/conf/log4j2.properties``."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # retrieval/
    return os.path.join(package, "conf", "log4j2.properties")


def jvm_levels(log_level: str | None) -> tuple[str, str]:
    """(root level, level of the noisy loggers) of the JVM for the CLI's ``--log-level``."""
    level = JVM_LEVELS.get(str(log_level or "WARNING").upper(), "WARN")
    noise = level if level in ("TRACE", "DEBUG", "INFO") else ("FATAL" if level == "FATAL" else "ERROR")
    return level, noise


def java_logging_options(log_level: str | None, existing: str = "") -> str:
    """``existing`` JVM options with the project's log4j2 file and levels in front: the user's own
    options come last, so their ``-Dretrieval.log.level=...`` wins; one that names its own log4j
    configuration file keeps it (nothing is added)."""
    existing = (existing or "").strip()
    if any(f"-D{p}=" in existing for p in LOG4J2_SYSPROPS):
        return existing
    level, noise = jvm_levels(log_level)
    path = log4j2_file()
    path = f'"{path}"' if any(c.isspace() for c in path) else path    # Spark splits options like a shell
    ours = f"-Dlog4j2.configurationFile={path} -Dretrieval.log.level={level} -Dretrieval.log.noise={noise}"
    return f"{ours} {existing}".strip()


# the driver JVM that pyspark launches in this process (``spark.fast_start``; not spark-submit's, never
# a cluster's executors): C1 only, and a dynamic class-data-sharing archive of the classes a session
# loads (made at the first such JVM's exit, used from the next start on). Measured on this project's
# 2-core machine under load: the JVM's CPU to start a session and run one job 11.6-12.8 s -> 3.2-3.3 s
FAST_START = ("-XX:+IgnoreUnrecognizedVMOptions", "-XX:TieredStopAtLevel=1", "-XX:+VerifySharedSpaces",
              "-Xlog:cds=off", "-Xlog:cds+dynamic=off")
ARCHIVE_SETTLE_S = 15.0       # a dump this old whose process is gone is complete (its JVM exited)


def _archive_path(cache: str) -> str:
    """The class archive's path: one per pyspark install, java binary and SPARK_HOME (an archive
    only loads into the JVM and class path that made it; another one is ignored, silently)."""
    import hashlib
    import shutil

    import pyspark

    java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else \
        (shutil.which("java") or "java")
    java = os.path.realpath(java)
    key = "|".join([pyspark.__version__, os.path.dirname(os.path.abspath(pyspark.__file__)), java,
                    str(os.path.getmtime(java)) if os.path.exists(java) else "", os.environ.get("SPARK_HOME", "")])
    return os.path.join(cache, f"spark-driver-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsa")


def _adopt_dump(final: str) -> None:
    """A dump of an earlier process (``final.<pid>.tmp``) becomes the archive once that process is
    gone and the file has not changed for :data:`ARCHIVE_SETTLE_S`; older duplicates are removed."""
    import glob
    import time

    for tmp in sorted(glob.glob(f"{glob.escape(final)}.*.tmp")):
        try:
            pid = int(tmp.rsplit(".", 2)[-2])
            if pid != os.getpid():
                try:
                    os.kill(pid, 0)
                    continue                      # its process still runs: maybe still dumping
                except ProcessLookupError:
                    pass
                except PermissionError:
                    continue
            if time.time() - os.path.getmtime(tmp) < ARCHIVE_SETTLE_S:
                continue
            if os.path.exists(final) or os.path.getsize(tmp) == 0:
                os.remove(tmp)
            else:
                os.replace(tmp, final)
        except (OSError, ValueError):
            continue


def fast_start_options(existing: str, cache: str) -> str:
    """``existing`` JVM options with :data:`FAST_START` and the class archive in front: the archive when
    there is one, else this JVM dumps one at its exit (to a file of its own, adopted by a later start)."""
    try:
        os.makedirs(cache, exist_ok=True)
        final = _archive_path(cache)
        _adopt_dump(final)
        cds = (f"-XX:SharedArchiveFile={final}" if os.path.exists(final)
               else f"-XX:ArchiveClassesAtExit={final}.{os.getpid()}.tmp")
        if any(c.isspace() for c in cds):
            cds = ""                              # Spark splits options like a shell: no archive then
    except OSError:
        cds = ""
    return " ".join(x for x in (*FAST_START, cds, (existing or "").strip()) if x)


def _spark_conf_dir() -> str | None:
    return os.environ.get("SPARK_CONF_DIR") or (
        os.path.join(os.environ["SPARK_HOME"], "conf") if os.environ.get("SPARK_HOME") else None)


def _spark_defaults() -> dict[str, str]:
    """spark-defaults.conf of SPARK_CONF_DIR (or SPARK_HOME/conf): a pyspark-launched driver reads
    it, but a value given to the builder replaces the file's, so ours are merged with it."""
    import re

    conf_dir = _spark_conf_dir()
    out: dict[str, str] = {}
    if not conf_dir:
        return out
    try:
        with open(os.path.join(conf_dir, "spark-defaults.conf"), encoding="utf-8") as f:
            for line in f:
                m = re.match(r"\s*([^\s=:#!][^\s=:]*)\s*[=:\s]\s*(.*?)\s*$", line)
                if m:
                    out[m.group(1)] = m.group(2)
    except OSError:
        pass
    return out


def _log4j2_source(jvm) -> str:
    """Where the JVM's log4j2 configuration came from: ``ours`` (the shipped file), ``spark-default``
    (Spark's built-in profile, or none), ``user`` (a file of the user's or the cluster's)."""
    try:
        ctx = jvm.org.apache.logging.log4j.LogManager.getContext(False)
        location = ctx.getConfiguration().getConfigurationSource().getLocation()
    except Exception:
        return "user"                    # unknown: leave it alone
    if not location or str(location).endswith("log4j2-defaults.properties"):
        return "spark-default"
    try:
        if os.path.samefile(str(location), log4j2_file()):
            return "ours"
    except OSError:
        pass
    return "user"


def _adopt_log4j2_config(jvm, log_level: str | None) -> bool:
    """Driver JVM already up (spark-submit starts it before this Python process): when it runs on
    Spark's built-in profile (no configuration of the user's or the cluster's), switch it to the
    project's file now, before the SparkContext starts and logs its INFO lines. True when the JVM
    runs on the project's file (now or already), False when it keeps a configuration of its own."""
    try:
        # let Spark initialise its logging first (silently): it would otherwise do it when the
        # SparkContext logs its first line, reloading its defaults over ours
        jvm.org.apache.spark.SparkConf(False).initializeLogIfNecessary(False, True)
        source = _log4j2_source(jvm)
        if source != "spark-default" or any(jvm.java.lang.System.getProperty(p) for p in LOG4J2_SYSPROPS):
            return source == "ours"
        level, noise = jvm_levels(log_level)
        jvm.java.lang.System.setProperty("retrieval.log.level", level)
        jvm.java.lang.System.setProperty("retrieval.log.noise", noise)
        jvm.org.apache.logging.log4j.LogManager.getContext(False).setConfigLocation(
            jvm.java.io.File(log4j2_file()).toURI())
        return True
    except Exception:                    # logging only: never fail a job over it
        return False


@contextlib.contextmanager
def jvm_stderr_filtered() -> Iterator[None]:
    """A driver JVM started inside gets as its stderr a pipe whose lines a daemon thread copies to
    this process's stderr, all but :data:`INCUBATOR_WARNING` (the JVM keeps that stderr for its
    life: its later warnings and errors, and its local executors', still reach the console)."""
    try:
        read_end, write_end = os.pipe()
        saved, out = os.dup(2), os.dup(2)
    except OSError:                      # no fd 2 (or no fds left): the JVM inherits what there is
        yield
        return
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    threading.Thread(target=_copy_lines, args=(read_end, out), name="jvm-stderr", daemon=True).start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _copy_lines(read_end: int, out: int) -> None:
    """The JVM's stderr (``read_end``) to ``out`` line by line, the incubator warning left out."""
    with os.fdopen(read_end, "rb") as src, os.fdopen(out, "wb", buffering=0) as dst:
        for line in iter(src.readline, b""):
            if line.rstrip(b"\r\n") != INCUBATOR_WARNING:
                try:
                    dst.write(line)
                except OSError:
                    pass


def get_spark(master: str | None, app_name: str = "retrieval", conf: Mapping[str, str] | None = None,
              log_level: str | None = None, fast_start: bool = False):
    """A SparkSession; an empty ``master`` keeps what spark-submit set. ``log_level`` (the CLI's
    ``--log-level``; default: Spark at WARN) sets the JVM's log4j2 levels: the project's
    configuration (``retrieval/conf/log4j2.properties``: console on stderr, environment noise at
    ERROR) goes to the driver and local executors through their extraJavaOptions, merged with the
    configured ones (README "Console output and log levels"). ``fast_start``: a driver JVM started
    here gets :func:`fast_start_options` (``spark.fast_start``, docs/cluster.md)."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    if master and master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    settings = {"spark.sql.execution.arrow.pyspark.enabled": "true",
                "spark.ui.showConsoleProgress": "false"}
    settings.update({k: str(v) for k, v in (conf or {}).items()})
    if SparkContext._active_spark_context is None:
        if os.environ.get("PYSPARK_GATEWAY_PORT") or SparkContext._jvm is not None:
            # the driver JVM is up: started by spark-submit, or by an earlier, stopped session
            SparkContext._ensure_initialized()
            jvm = SparkContext._jvm
            own_conf = not _adopt_log4j2_config(jvm, log_level)
            configured = {k: jvm.java.lang.System.getProperty(k) or ""
                          for k in (*JAVA_OPTION_KEYS, "spark.master")}
        else:                                            # pyspark starts the driver JVM below
            defaults = _spark_defaults()
            configured = {k: defaults.get(k, "") for k in (*JAVA_OPTION_KEYS, "spark.master")}
            conf_dir = _spark_conf_dir()                 # a log4j2.properties there is yours: kept
            own_conf = bool(conf_dir) and os.path.isfile(os.path.join(conf_dir, "log4j2.properties"))
            if not own_conf:
                settings["spark.driver.extraJavaOptions"] = java_logging_options(
                    log_level, settings.get("spark.driver.extraJavaOptions",
                                            configured["spark.driver.extraJavaOptions"]))
            if fast_start:
                from retrieval import fsio

                settings["spark.driver.extraJavaOptions"] = fast_start_options(settings.get(
                    "spark.driver.extraJavaOptions", configured["spark.driver.extraJavaOptions"]), fsio.cache_root())
        # executors: local masters only (local-cluster runs executor JVMs on this machine, where the
        # file's path is valid); on a cluster, ship the file (docs/cluster.md "Logging")
        if not own_conf and (master or configured["spark.master"]).startswith("local"):
            settings["spark.executor.extraJavaOptions"] = java_logging_options(
                log_level, settings.get("spark.executor.extraJavaOptions",
                                        configured["spark.executor.extraJavaOptions"]))
    for k, v in settings.items():
        builder = builder.config(k, str(v))
    starts_jvm = SparkContext._jvm is None and not os.environ.get("PYSPARK_GATEWAY_PORT")
    with jvm_stderr_filtered() if starts_jvm else contextlib.nullcontext():
        spark = builder.getOrCreate()
    if _log4j2_source(spark.sparkContext._jvm) == "spark-default":
        spark.sparkContext.setLogLevel(jvm_levels(log_level)[0])
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


class ProgressMonitor:
    """Driver-side progress of a Spark action: one bar (a terminal) or log lines every ``every``
    seconds (:class:`retrieval.progress.Progress`) of the tasks done, their rate and the ETA, from
    the status tracker. The action's jobs run in a job group of their own (named after ``label`` in
    Spark's UI), so the count is of this action's tasks only, over all its stages (a shuffle's map
    stage included: the total grows to their sum); the caller's job group is restored after."""

    POLL_S = 0.5

    def __init__(self, spark, label: str, total_tasks: int, every: float = 10.0) -> None:
        import threading
        import uuid

        from retrieval.progress import Progress

        self.spark, self.label, self.every = spark, label, every
        self.group = f"retrieval-{label.replace(' ', '-')}-{uuid.uuid4().hex[:8]}"
        self.progress = Progress(label, total=total_tasks, every=every, unit="tasks")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._saved: dict[str, Any] = {}

    def counts(self) -> tuple[int, int]:
        """(tasks completed, tasks in all stages) of the action's jobs so far."""
        tracker = self.spark.sparkContext.statusTracker()
        done = total = 0
        for job_id in tracker.getJobIdsForGroup(self.group):
            job = tracker.getJobInfo(job_id)
            for stage_id in (job.stageIds if job is not None else []):
                info = tracker.getStageInfo(stage_id)
                if info is not None:
                    done += info.numCompletedTasks
                    total += info.numTasks
        return done, total

    def _poll(self) -> None:
        done, total = self.counts()
        self.progress.set_done(done, max(total, self.progress.total or 0))

    def _loop(self) -> None:
        while not self._stop.wait(min(self.POLL_S, self.every)):
            try:
                self._poll()
            except Exception:             # the session stopping under us: no more progress
                return

    _GROUP_KEYS = ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel")

    def __enter__(self) -> "ProgressMonitor":
        sc = self.spark.sparkContext
        self._saved = {k: sc.getLocalProperty(k) for k in self._GROUP_KEYS}
        sc.setJobGroup(self.group, self.label)
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        sc = self.spark.sparkContext
        try:
            if exc_type is None:
                self._poll()
                self.progress.set_done(self.progress.total or self.progress.done)   # skipped stages
            for k, v in self._saved.items():
                sc.setLocalProperty(k, v)
        except Exception:
            pass
        self.progress.finish()
