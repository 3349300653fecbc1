"""``retrieval`` console command: one subcommand per pipeline stage.

    retrieval extract     --input URL --output URL --role gallery|query
    retrieval fit         --input URL --output MODEL_URL
    retrieval index       --features URL --output URL     (old name: build-index)
    retrieval search      --queries URL --index URL --output URL
    retrieval evaluate    --results URL --truth CSV
    retrieval report      --results URL --output URL
    retrieval train       --input URL --output URL
    retrieval plan        --images N
    retrieval export      --format onnx --output URL

Every subcommand takes ``--conf FILE`` (repeatable overlays), ``--set key=value`` (repeatable) and
``--master`` (Spark master; default from config, ``local[*]``); ``--engine local`` runs the same
library code without Spark. The ``jobs/<stage>.py`` spark-submit entry points call :func:`run_job`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any, Sequence

from retrieval import config as config_mod
from retrieval.engine import open_engine

log = logging.getLogger("retrieval")

# library errors whose message says what is wrong (no traceback): a model / checkpoint that cannot
# be loaded, a training setting that cannot run
CLEAR_ERRORS = {"ModelError", "TrainError"}

# third-party Python loggers whose INFO lines are not about the job
QUIET_LOGGERS = ("py4j", "faiss.loader")

# one name per stage: the subcommand, jobs/<stage>.py, the config section, the package or module, the
# Airflow task ids (<stage> or <stage>_<variant>) and the manifest's "stage". Each module's
# run_cli(args, cfg, engine) handles the arguments; the library does the work.
STAGES: dict[str, str] = {
    "extract": "retrieval.extract.cli",
    "fit": "retrieval.fit.cli",
    "index": "retrieval.index.cli",
    "search": "retrieval.search.cli",
    "evaluate": "retrieval.evaluate",
    "report": "retrieval.report.cli",
    "train": "retrieval.train.cli",
    "plan": "retrieval.plan",
    "export": "retrieval.export",
}
# old names, accepted (with a deprecation message) until 0.3: subcommands and job files
ALIASES = {"build-index": "index"}
JOB_ALIASES = {"extract_features": "extract", "build_index": "index", "audit_report": "report"}


def _common(p: argparse.ArgumentParser, spark_stage: bool = True, engine: str = "spark", writes: bool = True) -> None:
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="YAML overlay (repeatable, applied in order)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="override one config key (repeatable), e.g. --set extract.num_shards=16")
    p.add_argument("--log-level", default="INFO",
                   help="DEBUG, INFO (default: progress and summary lines), WARNING or ERROR; also sets "
                        "Spark's JVM logging: WARN for INFO/WARNING, INFO for DEBUG, ERROR for ERROR")
    if writes:
        p.add_argument("--overwrite", action="store_true",
                       help="replace what --output holds (another stage's, role's, input's or settings' "
                            "output, or other files); the same as <stage>.mode=overwrite where it exists")
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

    p = sub.add_parser("index", aliases=list(k for k, v in ALIASES.items() if v == "index"),
                       help="gallery feature shards -> sharded faiss IVF-PQ index (old name: build-index)")
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
                                                  "(default: <results>.eval)")
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
    _common(p, spark_stage=False, writes=False)

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
    if getattr(args, "overwrite", False) and args.stage in ("extract", "index"):
        out[f"{args.stage}.mode"] = "overwrite"      # the same concept, the config's spelling
    if getattr(args, "master", None) is not None:
        out["spark.master"] = args.master
    return out


def _deprecated(old: str, new: str) -> None:
    print(f"retrieval: {old} is deprecated and will be removed in 0.3: use {new}", file=sys.stderr)


def main(argv: Sequence[str] | None = None, exiting: bool = False) -> int:
    """Run one stage; returns the exit code. ``exiting``: the process ends right after (``entry``),
    so the session's stop does not wait for Python-side server threads (:func:`~retrieval.engine.open_engine`)."""
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
    if args.stage in ALIASES:
        _deprecated(f"retrieval {args.stage}", f"retrieval {ALIASES[args.stage]}")
        args.stage = ALIASES[args.stage]
    try:
        cfg = config_mod.load(args.conf, args.sets, _overrides(args))
    except config_mod.ConfigError as exc:
        print(f"retrieval {args.stage}: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        with open_engine(getattr(args, "engine", "local"), cfg, getattr(args, "master", None), args.log_level,
                         exiting=exiting) as engine:
            result = importlib.import_module(STAGES[args.stage]).run_cli(args, cfg, engine)
    except (config_mod.ConfigError, FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"retrieval {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if exc.__class__.__name__ not in CLEAR_ERRORS:
            raise
        print(f"retrieval {args.stage}: error: {exc}", file=sys.stderr)
        return 2
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


def run_job(job_file: str) -> None:
    """``jobs/<stage>.py``: the stage named by the file, with the command line's arguments
    (an old job file name is accepted with a deprecation message)."""
    name = os.path.splitext(os.path.basename(job_file))[0]
    if name in JOB_ALIASES:
        _deprecated(f"jobs/{name}.py", f"jobs/{JOB_ALIASES[name]}.py")
        name = JOB_ALIASES[name]
    if name not in STAGES:
        raise SystemExit(f"retrieval: {job_file} names no stage ({', '.join(STAGES)})")
    entry([name, *sys.argv[1:]])


if __name__ == "__main__":  # pragma: no cover
    entry()
