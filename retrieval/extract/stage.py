"""The ``extract`` stage: images -> Parquet feature shards (coarse 128-d + fine 512-d).

    retrieval extract --input URL --output URL [--role gallery|query]

The work is :func:`retrieval.extract.job.extract`."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from retrieval import fsio
from retrieval.stage import Stage, arg, positive_or_auto, choice, non_negative, positive

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


def run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> dict:
    from retrieval.extract.job import extract

    return extract(inputs["input"], output, cfg, engine)


def summary(m: dict, inputs: Mapping[str, Any], output: str | None) -> dict:
    """What the command prints: counts, model, timings, and the first failed files with their error."""
    out = {"output": output, "counts": m["counts"], "model_version": m["model_version"], "timings": m["timings"]}
    failed = m["counts"]["errors"]
    if failed:
        first = error_examples(output, m)
        where = fsio.join(output, "errors")
        out["failed"] = {"count": failed, "first": first, "all_in": where}
        log.warning("extract: %d of %d images failed (all listed in %s/*.parquet)%s", failed,
                    m["counts"]["inputs"], where, f"; the first {len(first)}:" if failed > len(first) else ":")
        for e in first:
            log.warning("extract: failed: %s: %s", e["file"], " ".join(str(e["error"]).split()))
    return out


def _check_regions(v: Any) -> str | None:
    from retrieval.extract.regions import check_names

    return check_names(v)


STAGE = Stage(
    name="extract",
    help="images -> Parquet feature shards (coarse 128-d + fine 512-d)",
    usage="--input URL --output URL --role gallery|query",
    args=(
        arg("--input", required=True, help="directory, CSV/Parquet manifest, or Parquet with bytes"),
        arg("--output", required=True, help="feature output URL (a directory)"),
        arg("--role", choices=("gallery", "query"), default=None, config_key="extract.role",
            help="gallery or query (default: extract.role from config, gallery)"),
    ),
    run=run,
    summary=summary,
    section="extract",
    checks={
        "extract.role": choice("gallery", "query"),
        "extract.query_regions": _check_regions,
        "extract.input_format": choice("auto", "dir", "manifest", "parquet"),
        "extract.num_shards": lambda v: None if 1 <= v <= 99999 else "must be in [1, 99999]",
        "extract.batch_size": positive,
        "extract.storage": choice("float32", "int8"),
        "extract.mode": choice("incremental", "overwrite"),
        "extract.threads": positive_or_auto,
        "extract.decode_threads": lambda v: None if v == "auto" or (v >= 0 and v == int(v))
        else "must be 'auto' or a whole number >= 0",
        "extract.row_group_size": positive,
        "extract.progress_seconds": positive,
        "extract.pdq": choice(True, False),
    },
    job_aliases=("extract_features",),
)
