"""``retrieval`` console command: one subcommand per pipeline stage, built from the stage registry
(:mod:`retrieval.registry`; ``retrieval --help`` lists them, ``retrieval STAGE --help`` shows each
option with its default).

Every subcommand takes ``--conf FILE`` (repeatable overlays), ``--set key=value`` (repeatable) and
``--log-level``; a stage that runs on an engine also takes ``--engine spark|local`` and ``--master``.
The ``jobs/<stage>.py`` spark-submit entry points call :func:`run_job`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from retrieval import __version__
from retrieval import config as config_mod
from retrieval import console
from retrieval import fsio
from retrieval import registry
from retrieval.engine import open_engine
from retrieval.stage import Stage

log = logging.getLogger("retrieval")

# library errors whose message says what is wrong (no traceback): a model / checkpoint that cannot
# be loaded, a training setting that cannot run
CLEAR_ERRORS = {"ModelError", "TrainError"}
# error types whose message says what is wrong: bad configuration or input, a missing file, no
# permission, a URL that cannot be reached (fsio.StorageError)
CLEAR_TYPES = (config_mod.ConfigError, FileNotFoundError, PermissionError, ValueError, fsio.StorageError)

# third-party Python loggers whose INFO lines are not about the job
QUIET_LOGGERS = ("py4j", "faiss.loader", "botocore", "aiobotocore", "s3fs")


DESCRIPTION = ("Billion-scale image gallery indexing and copy detection on Spark. "
               "Run `retrieval STAGE --help` for a stage's options.")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default shown (unless the help already says it, the option is
    required, or it is a flag), and descriptions kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.required or action.default is None or action.default is False
                or action.default == [] or action.default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def _common(p: argparse.ArgumentParser, stage: Stage) -> None:
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="YAML overlay (repeatable, applied in order)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="override one config key (repeatable), e.g. --set extract.num_shards=16")
    p.add_argument("--log-level", default="INFO",
                   help="DEBUG, INFO (progress and summary lines), WARNING or ERROR; also sets "
                        "Spark's JVM logging: WARN for INFO/WARNING, INFO for DEBUG, ERROR for ERROR")
    if stage.writes:
        p.add_argument("--overwrite", action="store_true",
                       help="replace what --output holds (another stage's, role's, input's or settings' "
                            "output, or other files); the same as <stage>.mode=overwrite where it exists")
    p.add_argument("--log-file", default=None, metavar="FILE",
                   help="the run's log file: its lines at every level and third-party output such as "
                        "faiss's warnings (default: $RETRIEVAL_LOG_FILE, else one per run under the temp "
                        "directory, named on the console)")
    if stage.engine is not None:
        p.add_argument("--master", default=None, help="Spark master (default: spark.master from config)")
        p.add_argument("--engine", choices=("spark", "local"), default=stage.engine,
                       help="spark, or local: the same library code in this process, no JVM")


def build_parser() -> argparse.ArgumentParser:
    """The ``retrieval`` command's parser, one subcommand per registered stage."""
    parser = argparse.ArgumentParser(prog="retrieval", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"retrieval {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in registry.stages().values():
        p = sub.add_parser(stage.name, aliases=list(stage.aliases), help=stage.help,
                           description=stage.help, formatter_class=_Formatter)
        for a in stage.args:
            p.add_argument(*a.flags, **a.options)
        _common(p, stage)
    return parser


def _split(stage: Stage, args: argparse.Namespace) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """(inputs, output, config overrides) from the parsed arguments."""
    inputs: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    output = None
    for a in stage.args:
        value = getattr(args, a.dest)
        if a.config_key is not None:
            if value is not None:
                overrides[a.config_key] = value
        elif a.dest == "output":
            output = value
        else:
            inputs[a.dest] = value
    if getattr(args, "master", None) is not None:
        overrides["spark.master"] = args.master
    if stage.writes:
        inputs["overwrite"] = bool(args.overwrite)
        if args.overwrite and stage.section is not None and "mode" in config_mod.defaults().get(stage.section, {}):
            overrides[f"{stage.section}.mode"] = "overwrite"      # the same concept, the config's spelling
    return inputs, output, overrides


def clear_error(exc: BaseException) -> str | None:
    """The one-line message the CLI prints for ``exc`` (exit code 2, no traceback), or None for an
    unexpected error (its traceback is shown). Clear: bad configuration or input (``ValueError``,
    a missing file, no permission; wrong-stage inputs are ``ValueError``), the library's own
    :data:`CLEAR_ERRORS`, and storage errors (no or wrong credentials, an unreachable endpoint or
    URL: :func:`retrieval.fsio.describe_error`)."""
    storage = fsio.describe_error(exc)
    if isinstance(exc, CLEAR_TYPES) or exc.__class__.__name__ in CLEAR_ERRORS:
        text = str(exc) or exc.__class__.__name__
        if storage is not None and storage not in text:
            text = f"{text}: {storage}"
    elif storage is not None:
        text = storage
    else:
        return None
    return " ".join(text.split())


def _deprecated(old: str, new: str) -> None:
    print(f"retrieval: {old} is deprecated and will be removed in 0.3: use {new}", file=sys.stderr)


def main(argv: Sequence[str] | None = None, exiting: bool = False) -> int:
    """Run one stage; returns the exit code. ``exiting``: the process ends right after (``entry``),
    so the session's stop does not wait for Python-side server threads (:func:`~retrieval.engine.open_engine`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    # the console: the project's lines; the run's log file: the same and third-party output
    log_file = console.setup_logging(level, args.stage, getattr(args, "log_file", None))
    if level > logging.DEBUG:
        # libraries' INFO chatter (py4j's "Closing down clientserver connection", faiss's
        # "Loading faiss with AVX512 support"): shown with --log-level DEBUG only
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(max(level, logging.WARNING))
    stage = registry.get(args.stage)
    if args.stage != stage.name:
        _deprecated(f"retrieval {args.stage}", f"retrieval {stage.name}")
        args.stage = stage.name
    inputs, output, overrides = _split(stage, args)
    try:
        cfg = registry.load_config(args.conf, args.sets, overrides)
    except config_mod.ConfigError as exc:
        print(f"retrieval {args.stage}: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        with open_engine(getattr(args, "engine", "local"), cfg, getattr(args, "master", None), args.log_level,
                         exiting=exiting) as engine:
            manifest = stage.run(inputs, output, stage.settings(cfg), engine)
            result = stage.summary(manifest, inputs, output) if manifest is not None else None
    except Exception as exc:
        message = clear_error(exc)
        if message is None:
            raise
        print(f"retrieval {args.stage}: error: {message}", file=sys.stderr)
        return 2
    finally:
        captured = console.thirdparty_lines(log_file)
        if captured:
            log.info("third-party output (%d lines, e.g. faiss warnings) is in the log file %s", captured, log_file)
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
    try:
        stage = registry.get(name)
    except KeyError:
        raise SystemExit(f"retrieval: {job_file} names no stage ({', '.join(registry.stages())})") from None
    if name != stage.name:
        _deprecated(f"jobs/{name}.py", f"jobs/{stage.name}.py")
    entry([stage.name, *sys.argv[1:]])


if __name__ == "__main__":  # pragma: no cover
    entry()
