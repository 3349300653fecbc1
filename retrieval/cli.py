"""``retrieval`` console command: one subcommand per pipeline stage.

    retrieval extract     --input URL --output URL --role gallery|query
    retrieval fit         --input URL --output MODEL_URL
    retrieval build-index --features URL --output URL
    retrieval search      --queries URL --index URL --output URL
    retrieval evaluate    --results URL --truth CSV
    retrieval report      --results URL --output URL
    retrieval train       --input URL --output URL
    retrieval plan        --images N
    retrieval export      --format onnx --output URL

Every subcommand takes ``--conf FILE`` (repeatable overlays), ``--set key=value`` (repeatable) and
``--master`` (Spark master; default from config, ``local[*]``); ``--engine local`` runs the same
library code without Spark. The ``jobs/*.py`` spark-submit entry points call :func:`main`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

from retrieval import config as config_mod

log = logging.getLogger("retrieval")

# library errors whose message says what is wrong (no traceback): a model / checkpoint that cannot
# be loaded, a training setting that cannot run
CLEAR_ERRORS = {"ModelError", "TrainError"}

# third-party Python loggers whose INFO lines are not about the job
QUIET_LOGGERS = ("py4j", "faiss.loader")

STAGES: dict[str, Callable[[argparse.Namespace, config_mod.Config, Any], Any]] = {}


def _common(p: argparse.ArgumentParser, spark_stage: bool = True, engine: str = "spark") -> None:
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="YAML overlay (repeatable, applied in order)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="override one config key (repeatable), e.g. --set extract.num_shards=16")
    p.add_argument("--log-level", default="INFO",
                   help="DEBUG, INFO (default: progress and summary lines), WARNING or ERROR; also sets "
                        "Spark's JVM logging: WARN for INFO/WARNING, INFO for DEBUG, ERROR for ERROR")
    if spark_stage:
        p.add_argument("--master", default=None, help="Spark master (default: spark.master from config)")
        p.add_argument("--engine", choices=("spark", "local"), default=engine,
                       help=f"spark or local (the same library code in this process, no JVM); default {engine}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrieval", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("extract", help="images -> Parquet feature shards (coarse 128-d + fine 512-d)")
    p.add_argument("--input", required=True, help="directory, CSV/Parquet manifest, or Parquet with bytes")
    p.add_argument("--output", required=True)
    p.add_argument("--role", choices=("gallery", "query"), default=None)
    _common(p)

    p = sub.add_parser("fit", help="fit whitening (+ PCA heads, adapter-2 re-fit) of the model to a gallery "
                                   "sample -> a checkpoint for model.checkpoint")
    p.add_argument("--input", required=True, help="gallery images: directory, CSV/Parquet manifest, or "
                                                  "Parquet with bytes")
    p.add_argument("--output", required=True, help="checkpoint URL to write (then --set model.checkpoint=URL)")
    _common(p)

    p = sub.add_parser("build-index", help="gallery feature shards -> sharded faiss IVF-PQ index")
    p.add_argument("--features", required=True, action="append",
                   help="feature output URL (repeatable; with --append, the new shards to add)")
    p.add_argument("--output", required=True)
    p.add_argument("--append", action="store_true", help="add new features to an existing index")
    p.add_argument("--merge-ondisk", action="store_true",
                   help="also merge the shards into one on-disk index (single-machine serving)")
    _common(p)

    p = sub.add_parser("search", help="two-stage search: coarse IVF-PQ per shard, merge, exact 512-d rerank")
    p.add_argument("--queries", required=True, help="query images (any extract input) or query features")
    p.add_argument("--index", required=True)
    p.add_argument("--output", required=True)
    _common(p)

    p = sub.add_parser("evaluate", help="recall@k, micro-AP and a PR curve against ground truth")
    p.add_argument("--results", required=True)
    p.add_argument("--truth", required=True, help="CSV: query_id, gallery_id (empty: no true match)")
    p.add_argument("--output", default=None, help="where to write metrics.json and pr_curve.png "
                                                  "(default: <results>/eval)")
    p.add_argument("--exact", default=None, metavar="INDEX",
                   help="also compare with exact 512-d search over this index's gallery")
    _common(p, engine="local")     # reads results with pyarrow: no executors needed

    p = sub.add_parser("report", help="audit report: HTML, flagged matches, summary.json")
    p.add_argument("--results", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--truth", default=None)
    _common(p, engine="local")     # streams results with pyarrow on the driver: no executors needed

    p = sub.add_parser("train", help="three-stage training of the descriptor model")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True, help="checkpoint directory URL")
    _common(p)

    p = sub.add_parser("plan", help="capacity plan for N images from measured rates")
    p.add_argument("--images", required=True, type=float, help="gallery images, e.g. 1e9")
    p.add_argument("--queries", type=float, default=10_000_000, help="queries per search run")
    p.add_argument("--executors", type=int, default=100)
    p.add_argument("--executor-memory", default="16g")
    p.add_argument("--executor-cores", type=int, default=4)
    p.add_argument("--gpus", type=int, default=0)
    _common(p, spark_stage=False)

    p = sub.add_parser("export", help="the model's trunk (backbone + GeM) as an ONNX file for model.runtime=onnx")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--output", required=True, help="file URL to write (then --set model.runtime=onnx "
                                                   "--set model.onnx_file=URL)")
    _common(p, spark_stage=False)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "role", None):
        out["extract.role"] = args.role
    if getattr(args, "master", None) is not None:
        out["spark.master"] = args.master
    return out


def _spark_for(args: argparse.Namespace, cfg: config_mod.Config):
    if getattr(args, "engine", "local") != "spark":
        return None
    from retrieval.sparkutil import get_spark

    master = cfg["spark.master"]
    if os.environ.get("PYSPARK_GATEWAY_PORT") and getattr(args, "master", None) is None:
        master = ""  # launched by spark-submit: keep its --master
    return get_spark(master, cfg["spark.app_name"], cfg["spark.conf"], log_level=args.log_level)


def _run_extract(args, cfg, spark):
    from retrieval.features.extract import extract

    m = extract(args.input, args.output, cfg, spark)
    return {"output": args.output, "counts": m["counts"], "model_version": m["model_version"],
            "timings": m["timings"]}


def _lazy(module: str, func: str) -> Callable:
    def run(args, cfg, spark):
        import importlib

        return getattr(importlib.import_module(module), func)(args, cfg, spark)
    return run


STAGES.update({
    "extract": _run_extract,
    "fit": _lazy("retrieval.fit.job", "run_cli"),
    "build-index": _lazy("retrieval.index.cli", "run"),
    "search": _lazy("retrieval.search.cli", "run"),
    "evaluate": _lazy("retrieval.evaluate", "run_cli"),
    "report": _lazy("retrieval.audit.cli", "run"),
    "train": _lazy("retrieval.training.cli", "run"),
    "plan": _lazy("retrieval.plan", "run_cli"),
    "export": _lazy("retrieval.features.export", "run_cli"),
})


def main(argv: Sequence[str] | None = None, exiting: bool = False) -> int:
    """Run one stage; returns the exit code. ``exiting``: the process ends right after (``entry``),
    so the session's stop does not wait for Python-side server threads (:func:`~retrieval.sparkutil.stop_spark`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if level > logging.DEBUG:
        # libraries' INFO chatter (py4j's "Closing down clientserver connection", faiss's
        # "Loading faiss with AVX512 support"): shown with --log-level DEBUG only
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(max(level, logging.WARNING))
    try:
        cfg = config_mod.load(args.conf, args.sets, _overrides(args))
    except config_mod.ConfigError as exc:
        print(f"retrieval {args.stage}: configuration error: {exc}", file=sys.stderr)
        return 2
    spark = None
    try:
        spark = _spark_for(args, cfg)
        result = STAGES[args.stage](args, cfg, spark)
    except (config_mod.ConfigError, FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"retrieval {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if exc.__class__.__name__ not in CLEAR_ERRORS:
            raise
        print(f"retrieval {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if spark is not None and not os.environ.get("PYSPARK_GATEWAY_PORT"):
            from retrieval.sparkutil import stop_spark

            stop_spark(spark, join_python_threads=not exiting)
    if result is not None:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


def entry(argv: Sequence[str] | None = None) -> None:
    """Console-script and ``jobs/*.py`` entry: run, flush, and leave without interpreter teardown,
    where native thread pools (pyarrow + torch) can abort a finished job (apache/arrow#50482)."""
    code = main(argv, exiting=True)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
