"""The ``extract`` stage: images -> Parquet feature shards (coarse 128-d + fine 512-d).

    retrieval extract --input URL --output URL [--role gallery|query]

The work is :func:`retrieval.extract.job.extract`."""
from __future__ import annotations

from typing import Any, Mapping

from retrieval.stage import Stage, arg, choice, non_negative, positive


def run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> dict:
    from retrieval.extract.job import extract

    return extract(inputs["input"], output, cfg, engine)


def summary(m: dict, inputs: Mapping[str, Any], output: str | None) -> dict:
    return {"output": output, "counts": m["counts"], "model_version": m["model_version"],
            "timings": m["timings"]}


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
        "extract.input_format": choice("auto", "dir", "manifest", "parquet"),
        "extract.num_shards": lambda v: None if 1 <= v <= 99999 else "must be in [1, 99999]",
        "extract.batch_size": positive,
        "extract.storage": choice("float32", "int8"),
        "extract.mode": choice("incremental", "overwrite"),
        "extract.threads": non_negative,
        "extract.row_group_size": positive,
        "extract.progress_seconds": positive,
    },
    job_aliases=("extract_features",),
)
