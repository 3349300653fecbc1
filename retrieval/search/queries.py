"""Query input of the search: images (encoded here with the QUERY role) or query features, the
model_version compatibility check, and the query chunks."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from retrieval import fsio, outputs
from retrieval.config import Config

log = logging.getLogger(__name__)


class IncompatibleModelError(ValueError):
    """Queries, index and gallery features were not all encoded by the same model."""


def extraction_manifest(url: str) -> dict | None:
    """The manifest of an extraction output at ``url``, or None if ``url`` is not one."""
    return outputs.find(url, "extract")


def check_compatible(query_version: str, index_url: str, index_manifest: dict, where: str) -> None:
    """Refuse (clear error) unless the queries, the index and every gallery feature file share one
    model_version."""
    iv = index_manifest.get("model_version")
    if iv != query_version:
        raise IncompatibleModelError(
            f"model_version mismatch: the queries ({where}) were encoded by {query_version!r} but the "
            f"index {index_url} by {iv!r}; re-extract the queries with the index's model "
            "(model.checkpoint / model.* settings) or rebuild the index")
    for f in index_manifest.get("feature_files", []):
        fv = f.get("model_version", iv)
        if fv != query_version:
            raise IncompatibleModelError(
                f"model_version mismatch: gallery feature file {f.get('url')} (file_no {f.get('file_no')}) "
                f"was encoded by {fv!r}, the queries ({where}) by {query_version!r}")


def config_model_version(cfg: Config) -> str:
    """The configured model's ``model_version``, from its metadata: the network is not built here
    (:func:`retrieval.model.version.configured_model_version`)."""
    from retrieval.model.version import configured_model_version

    return configured_model_version(cfg["model"].to_dict(), cfg["preprocess"].to_dict())


def query_features_url(output_url: str) -> str:
    """Where the search encodes query images: ``<output>.query_features``, a sibling of the results
    (inside them, every Parquet reader that recurses would take its rows for result rows)."""
    return output_url.rstrip("/") + ".query_features"


def resolve_queries(queries_url: str, output_url: str, index_url: str, index_manifest: dict,
                    cfg: Config, engine=None, overwrite: bool = False) -> tuple[str, dict, float]:
    """``(query_features_url, its manifest, encode seconds)``. Query features are used as they
    are; anything else is an extraction input, encoded with role=query into
    ``<output>.query_features`` (:func:`query_features_url`; incremental: a rerun reuses finished
    shards) - but only after the configured model is checked against the index, so nothing is
    encoded in vain."""
    import time

    m = extraction_manifest(queries_url)
    if m is not None:
        if m.get("role") != "query":
            raise ValueError(f"{queries_url} holds {m.get('role')!r} features; the search needs "
                             "features extracted with --role query (low-resolution adapter-2 coarse "
                             "codes), or pass the query images themselves")
        check_compatible(m.get("model_version"), index_url, index_manifest, queries_url)
        return queries_url, m, 0.0
    check_compatible(config_model_version(cfg), index_url, index_manifest, "the configured model")
    from retrieval.extract.job import extract   # torch: only when queries are images

    t0 = time.monotonic()
    qf_url = query_features_url(output_url)
    over = {"extract.role": "query", **({"extract.mode": "overwrite"} if overwrite else {})}
    m = extract(queries_url, qf_url, cfg.with_overrides(over), engine)
    check_compatible(m["model_version"], index_url, index_manifest, qf_url)
    return qf_url, m, time.monotonic() - t0


def query_files(qf_url: str, manifest: dict, verify: bool) -> tuple[list[str], list[int]]:
    """URLs and row counts of the query feature files (sha256-checked when ``verify``)."""
    urls, rows = [], []
    for s in manifest.get("shards", []):
        url = fsio.join(qf_url, fsio.safe_relpath(s["file"]))
        if verify and s.get("sha256") and fsio.sha256_file(url) != s["sha256"]:
            raise ValueError(f"query feature file {url} does not match the sha256 in its manifest "
                             "(truncated or altered)")
        urls.append(url)
        rows.append(int(s.get("rows", s.get("ok", 0))))     # rows: with query regions, > images
    return urls, rows


@dataclass(frozen=True)
class Chunk:
    """Up to ``search.query_chunk`` consecutive rows of one query feature file: the unit of a
    search task's memory and of its output (``part-NNNNN.parquet``, NNNNN = ``chunk``)."""
    chunk: int
    file_no: int      # index into the job's query files
    start: int        # first row in that file
    stop: int         # one past the last row


def plan_chunks(rows: list[int], chunk_size: int, starts: list | None = None) -> list[Chunk]:
    """Chunks of up to ``chunk_size`` rows per file; with ``starts`` (per file, the rows that start
    a query image: query regions) cut only there, so an image's rows stay in one chunk (a chunk
    holds at least one image, and at most ``chunk_size`` rows unless one image has more)."""
    import numpy as np

    chunks: list[Chunk] = []
    for f, n in enumerate(rows):
        a = 0
        while a < n:
            b = min(n, a + chunk_size)
            if starts is not None and b < n:
                st = np.asarray(starts[f])
                i = int(np.searchsorted(st, b, side="right")) - 1      # the last start <= b
                b = int(st[i]) if st[i] > a else int(st[min(i + 1, len(st) - 1)]) if i + 1 < len(st) else n
            chunks.append(Chunk(len(chunks), f, a, b))
            a = b
    return chunks
