"""Reading the gallery's coarse codes from extraction outputs, in bounded memory.

A :class:`FeatureFile` is one ``part-NNNNN.parquet`` of a COMPLETE extraction output (one with
``_manifest.json``), numbered by ``file_no`` in the order the index saw it; the int64 index id of
its row ``r`` is ``idmap.encode_ids(file_no, r)``. Vectors are read by (file, row range), one
batch of at most ``batch_rows`` rows at a time, ``coarse`` column only. :func:`clean` is the one rule for bad vectors, applied identically when sampling,
adding and measuring quality: NaN/inf rows and all-zero rows are skipped, the rest are
L2-normalised (a no-op for extraction outputs, which are normalised already).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from retrieval import fsio, outputs
from retrieval.engine import task_error
from retrieval.schema import column_matrix


@task_error
class FeatureInputError(ValueError):
    """A gallery feature input cannot be indexed (the message names the output or file)."""


@dataclass(frozen=True)
class FeatureFile:
    file_no: int
    url: str
    sha256: str
    rows: int
    storage: str
    model_version: str
    output: str  # the extraction output it belongs to

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureFile":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def read_extract_manifest(output_url: str) -> dict:
    """The extraction output's manifest; any problem with it is a :class:`FeatureInputError`."""
    try:
        return outputs.read(output_url, "extract")
    except (FileNotFoundError, outputs.OutputError) as exc:
        raise FeatureInputError(str(exc)) from None


def list_feature_files(output_urls: Sequence[str], first_file_no: int = 0,
                       model_version: str | None = None) -> list[FeatureFile]:
    """The feature files of ``output_urls`` (in order), numbered from ``first_file_no``. Refuses
    incomplete outputs, query features, and features of another model_version than the first
    (or than ``model_version`` when given: the index's)."""
    files: list[FeatureFile] = []
    versions: dict[str, str] = {}
    for out in output_urls:
        m = read_extract_manifest(out)
        if m.get("role", "gallery") != "gallery":
            raise FeatureInputError(f"{out}: holds {m.get('role')!r} features; an index is built "
                                    "from gallery features (extract --role gallery)")
        mv = m.get("model_version")
        if not mv:
            raise FeatureInputError(f"{out}: its manifest has no model_version")
        expected = model_version or (next(iter(versions.values())) if versions else None)
        if expected is not None and mv != expected:
            what = "the index" if model_version else f"{next(iter(versions))}"
            raise FeatureInputError(
                f"{out}: model_version {mv} differs from {what} ({expected}): codes of different "
                "models are not comparable; re-extract with the same model (or build a new index)")
        versions[out] = mv
        for s in m.get("shards", []):
            if s.get("ok", 0) == 0 and not s.get("file"):
                continue
            url = fsio.join(out, fsio.safe_relpath(s["file"]))
            files.append(FeatureFile(file_no=first_file_no + len(files), url=url, sha256=s["sha256"],
                                     rows=int(s.get("ok", 0)), storage=m.get("storage", "float32"),
                                     model_version=mv, output=out))
    return files


def check_file(f: FeatureFile, dim: int, verify: bool = True) -> None:
    """The file matches its manifest (sha256, rows) and holds ``dim``-d coarse codes of its model."""
    if verify:
        try:
            digest = fsio.sha256_file(f.url)
        except FileNotFoundError:
            raise FeatureInputError(f"feature file {f.url} is missing") from None
        if digest != f.sha256:
            raise FeatureInputError(f"feature file {f.url} does not match the sha256 in its "
                                    "manifest (truncated or altered): refusing to index it")
    try:
        pf = fsio.parquet_file(f.url)
        schema = pf.schema_arrow
        rows = pf.metadata.num_rows
        if "coarse" not in schema.names:
            raise FeatureInputError(f"feature file {f.url} has no 'coarse' column")
        ctype = schema.field("coarse").type
        got = getattr(ctype, "list_size", None)
        if got is None and rows:  # variable-size lists (e.g. written by Spark): look at row 0
            first = pf.read_row_group(0, columns=["coarse"]).column(0)
            got = len(first[0].as_py()) if len(first) else None
        versions = (pf.read(columns=["model_version"]).column(0).unique().to_pylist()
                    if "model_version" in schema.names else [])
    except FeatureInputError:
        raise
    except Exception as exc:
        raise FeatureInputError(f"feature file {f.url} is not readable Parquet: {exc}") from exc
    if rows != f.rows:
        raise FeatureInputError(f"feature file {f.url} has {rows} rows, its manifest says {f.rows}")
    if got is not None and got != dim:
        raise FeatureInputError(f"feature file {f.url}: coarse vectors have {got} dimensions, "
                                f"the index expects {dim} (config model.coarse_dim)")
    other = [v for v in versions if v != f.model_version]
    if other:
        raise FeatureInputError(f"feature file {f.url}: rows of model_version {other[0]} in an "
                                f"output of {f.model_version}")


def iter_coarse(url: str, start: int, end: int, batch_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first_row, coarse float32 n x d)`` for rows ``[start, end)`` of a feature file, at most
    ``batch_rows`` rows per batch; only the row groups that hold them are read."""
    if end <= start:
        return
    pf = fsio.parquet_file(url)
    md = pf.metadata
    bounds = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
    if end > bounds[-1]:
        raise FeatureInputError(f"feature file {url} has {bounds[-1]} rows, rows up to {end} "
                                "were expected (truncated?)")
    g0 = int(np.searchsorted(bounds, start, side="right") - 1)
    g1 = int(np.searchsorted(bounds, end, side="left"))
    row = int(bounds[g0])
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=list(range(g0, g1)), columns=["coarse"],
                                 use_threads=False):
        n = batch.num_rows
        a, b = max(start, row), min(end, row + n)
        if a < b:
            x = column_matrix(batch.column(0).slice(a - row, b - a)).astype(np.float32, copy=False)
            yield a, (x if x.flags.writeable else x.copy())
        row += n
        if row >= end:
            break


def clean(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(valid mask, nan_inf mask, zero mask, renormalised count)``: NaN/inf and all-zero rows
    are invalid; valid rows whose norm is off 1 are L2-normalised in place."""
    finite = np.isfinite(x).all(axis=1)
    norms = np.zeros(len(x), np.float32)
    if finite.all():
        norms[:] = np.linalg.norm(x, axis=1)
    else:
        norms[finite] = np.linalg.norm(x[finite], axis=1)
    zero = finite & (norms == 0)
    valid = finite & ~zero
    off = valid & (np.abs(norms - 1.0) > 1e-3)
    if off.any():
        x[off] /= norms[off, None]
    return valid, ~finite, zero, int(off.sum())


def read_column(url: str, column: str) -> pa.Array:
    col = fsio.read_parquet(url, columns=[column]).column(0)
    return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
