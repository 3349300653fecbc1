"""The reader of a search output (``retrieval search``): all its result rows, checked.

Apart from the stage (:mod:`retrieval.search.job`) so that the stages that read results (evaluate,
report) import the reader, never the search job.
"""
from __future__ import annotations

import pyarrow as pa

from retrieval import fsio, outputs
from retrieval.schema import RESULT_SCHEMA, conform_results


def read_results(output_url: str) -> pa.Table:
    """All result rows of a COMPLETE search output, or of a ``retrieval pdq match`` output (the same
    result schema; files checked against the manifest)."""
    m = read_results_manifest(output_url)
    tables = []
    for f in m.get("files", []):
        url = fsio.join(output_url, fsio.safe_relpath(f["file"]))
        if f.get("sha256") and fsio.sha256_file(url) != f["sha256"]:
            raise ValueError(f"result file {url} does not match the sha256 in {outputs.marker_url(output_url)}")
        tables.append(conform_results(fsio.read_parquet(url)))
    return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()


def read_results_manifest(output_url: str, hint: str = "") -> dict:
    """The manifest of a complete search output or PDQ match output (``stage`` says which)."""
    try:
        return outputs.read(output_url, "search", hint=hint)
    except outputs.WrongStageError as exc:
        if "stage is 'pdq'" not in str(exc):      # another stage's output: the search's error
            raise
        return outputs.read(output_url, "pdq", hint=hint)
