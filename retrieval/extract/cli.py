"""``retrieval extract --input URL --output URL [--role gallery|query]``: argument handling and the
run's summary; the work is :func:`retrieval.extract.job.extract`."""
from __future__ import annotations

import argparse
import logging

from retrieval import fsio
from retrieval.config import Config
from retrieval.engine import Engine

log = logging.getLogger(__name__)

# failed images named in the summary (all of them are in <output>/errors/*.parquet)
ERROR_EXAMPLES = 5


def error_examples(output: str, manifest: dict, limit: int = ERROR_EXAMPLES) -> list[dict]:
    """The first ``limit`` failed images of an extraction (shard order), ``{"file", "error"}``,
    read from the shards' error files that the manifest lists."""
    out: list[dict] = []
    for shard in manifest["shards"]:
        if not shard.get("errors"):
            continue
        table = fsio.read_parquet(fsio.join(output, fsio.safe_relpath(shard["errors_file"])), columns=["uri", "error"])
        for uri, error in zip(table.column("uri").to_pylist(), table.column("error").to_pylist()):
            out.append({"file": uri, "error": error})
            if len(out) >= limit:
                return out
    return out


def run_cli(args: argparse.Namespace, cfg: Config, engine: Engine) -> dict:
    from retrieval.extract.job import extract

    m = extract(args.input, args.output, cfg, engine)
    summary = {"output": args.output, "counts": m["counts"], "model_version": m["model_version"],
               "timings": m["timings"]}
    failed = m["counts"]["errors"]
    if failed:
        first = error_examples(args.output, m)
        where = fsio.join(args.output, "errors")
        summary["failed"] = {"count": failed, "first": first, "all_in": where}
        log.warning("extract: %d of %d images failed (all listed in %s/*.parquet)%s", failed,
                    m["counts"]["inputs"], where, f"; the first {len(first)}:" if failed > len(first) else ":")
        for e in first:
            log.warning("extract: failed: %s: %s", e["file"], " ".join(str(e["error"]).split()))
    return summary
