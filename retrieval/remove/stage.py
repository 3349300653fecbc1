"""The ``remove`` stage: take gallery images down from an index, effective for every search at once.

    retrieval remove --index URL --ids URL [--restore]

The work is :func:`retrieval.remove.job.remove`; compaction is ``retrieval index --compact``."""
from __future__ import annotations

from typing import Any, Mapping

from retrieval.stage import Stage, arg


def run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> dict:
    from retrieval.remove.job import remove

    return remove(inputs["index"], inputs["ids"], cfg, engine, restore=bool(inputs.get("restore")))


def summary(m: dict, inputs: Mapping[str, Any], output: str | None) -> dict:
    t = m["takedowns"]
    return {"index": inputs["index"], **{k: v for k, v in t["batches"][-1].items() if k not in ("engine",)},
            "listed_ids": t["removed_ids"], "tombstoned_rows": t["tombstoned_rows"], "live": m.get("live")}


STAGE = Stage(
    name="remove",
    help="take gallery images down from an index: never returned by a search from the moment it commits",
    usage="--index URL --ids URL",
    args=(
        arg("--index", required=True, help="index URL (changed in place, under its lease)"),
        arg("--ids", required=True,
            help="image ids: a text file (one a line), a CSV or a Parquet table with an image_id column"),
        arg("--restore", action="store_true", help="lift the takedown of these ids instead"),
    ),
    run=run,
    summary=summary,
    writes=False,
)
