"""The ``report`` stage: the offline HTML audit report, flagged matches and summary.json.

    retrieval report --results URL --output URL [--truth CSV]

The report streams the results with pyarrow on the driver (bounded memory, no collect), so it needs
no Spark executors; under spark-submit the engine is simply not used. The work is
:func:`retrieval.report.job.build_report`."""
from __future__ import annotations

from typing import Any, Mapping

from retrieval.stage import Stage, arg, ascending_scores, choice, non_negative, positive


def run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> dict:
    from retrieval.report.job import build_report

    return build_report(inputs["results"], output, cfg, truth_url=inputs.get("truth") or None,
                        overwrite=bool(inputs.get("overwrite")))


def _threshold(v: Any) -> str | None:
    if isinstance(v, Mapping):
        return None if v.get("precision", 0.9) in (0.9, 0.95) and v.get("from_evaluation") \
            else "from_evaluation needs a metrics.json URL and precision 0.9 or 0.95"
    return None if v == "auto" or -1.0 <= v <= 1.0 else "must be in [-1, 1]"


STAGE = Stage(
    name="report",
    help="audit report: HTML, flagged matches, summary.json",
    usage="--results URL --output URL",
    args=(
        arg("--results", required=True, help="search output URL"),
        arg("--output", required=True, help="report output URL (a directory)"),
        arg("--truth", default=None, help="CSV of true pairs (query_id, gallery_id): adds precision to the report"),
    ),
    run=run,
    section="report",
    checks={
        "report.threshold": _threshold,
        "report.target_fmr": lambda v: None if 0.0 < v < 1.0 else "must be in (0, 1)",
        "report.bands": ascending_scores,
        "report.norm_bands": ascending_scores,
        "report.top_queries": non_negative,
        "report.matches_per_query": positive,
        "report.thumbnails": choice("embed", "files", "none"),
        "report.thumbnail_size": lambda v: None if 16 <= v <= 1024 else "must be in [16, 1024]",
        "report.full_size": lambda v: None if v == 0 or 256 <= v <= 8192 else "must be 0 (off) or in [256, 8192]",
        "report.thumbnail_threads": positive,
        "report.histogram_bins": lambda v: None if 1 <= v <= 1000 else "must be in [1, 1000]",
        "report.histogram_min": lambda v: None if -1.0 <= v < 1.0 else "must be in [-1, 1)",
        "report.batch_rows": positive,
        "report.errors_shown": non_negative,
        "report.progress_seconds": positive,
        "report.groups_shown": non_negative,
        "report.group_members": positive,
    },
    nullable={"report.duplicates": str},
    engine="local",
    job_aliases=("audit_report",),
)
