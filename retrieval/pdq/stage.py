"""The ``pdq`` stage: PDQ hash lists (docs/lifecycle.md "PDQ hash lists").

    retrieval pdq export --features URL --output FILE
    retrieval pdq match --hash-list URL --index URL --output URL

One stage with two actions (stage names are one word: ``jobs/pdq.py``, the ``pdq`` config
section); the work is :mod:`retrieval.pdq.job`."""
from __future__ import annotations

from typing import Any, Mapping

from retrieval.stage import Stage, arg, between, choice, non_negative, positive

ACTIONS = ("export", "match")
# the arguments each action needs (argparse cannot make them required per action)
NEEDS = {"export": ("features", "output"), "match": ("hash_list", "index", "output")}


def run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> dict:
    from retrieval.pdq import job

    action = inputs["action"]
    missing = [n for n in NEEDS[action] if not (output if n == "output" else inputs.get(n))]
    if missing:
        raise ValueError(f"retrieval pdq {action} needs " + ", ".join("--" + n.replace("_", "-") for n in missing))
    overwrite = bool(inputs.get("overwrite"))
    if action == "export":
        return job.export(inputs["features"], output, cfg, overwrite=overwrite)
    return job.match(inputs["hash_list"], inputs["index"], output, cfg, engine, overwrite=overwrite)


def summary(m: dict, inputs: Mapping[str, Any], output: str | None) -> dict:
    return {"output": output, "action": inputs["action"], "counts": m.get("counts"), "timings": m.get("timings")}


STAGE = Stage(
    name="pdq",
    help="PDQ hash lists: export the gallery's hashes as CSV, match a partner's list against the index",
    usage="export --features URL --output FILE | match --hash-list URL --index URL --output URL",
    args=(
        arg("action", choices=ACTIONS, help="export: features -> CSV (hash, image_id, quality); "
                                             "match: a hash list against an index's PDQ hashes"),
        arg("--features", help="export: a feature output extracted with --set extract.pdq=true"),
        arg("--hash-list", help="match: CSV with columns hash (64 hex digits) and image_id (quality optional)"),
        arg("--index", help="match: an index built from features with PDQ hashes"),
        arg("--output", required=True, help="export: the CSV file; match: the result output URL (a directory)"),
    ),
    run=run,
    summary=summary,
    section="pdq",
    checks={
        "pdq.max_distance": between(0, 64),
        "pdq.dihedral": choice(True, False),
        "pdq.min_quality": between(0, 100),
        "pdq.top_k": positive,
        "pdq.exact": choice(True, False),
        "pdq.chunk_rows": positive,
        "pdq.shard_rows": positive,
        "pdq.progress_seconds": non_negative,
    },
)
