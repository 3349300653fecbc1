"""What the report knows about a run: the search manifest (required) and the manifests of the
stages behind it (query extraction, index, gallery extraction), each read defensively.

The search output (``<results>/_manifest.json``, stage ``search``) names the index directory
(``index``, whose ``_manifest.json`` lists ``feature_files[].url``: the gallery feature shards,
whose parent directories are extraction outputs with ``_manifest.json``) and the query feature
output (``query_features``). A missing or unreadable search manifest is an error (the search did
not finish); a missing upstream manifest is reported on the page as unavailable, with the reason.
"""
from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from retrieval import fsio, outputs
from retrieval.schema import RESULT_REQUIRED


@dataclass
class StageInfo:
    """One upstream stage as the report shows it."""
    name: str
    url: str | None
    available: bool = True
    problem: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    model_versions: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error_samples: list[tuple[str, str, str]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)    # the image inputs its manifest(s) record

    def to_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"available": self.available, "counts": self.counts}
        if self.problem:
            out["problem"] = self.problem
        return out


@dataclass
class RunInfo:
    results_url: str
    manifest: dict[str, Any]
    result_files: list[str]
    stages: list[StageInfo]

    @property
    def model_version(self) -> str | None:
        return self.manifest.get("model_version")

    def stage(self, name: str) -> StageInfo:
        return next(s for s in self.stages if s.name == name)

    def input_urls(self) -> list[str]:
        """The image inputs of the extractions behind the results (the roots thumbnails may read)."""
        return [u for s in self.stages for u in s.inputs]

    def version_problems(self) -> list[str]:
        """Model versions that differ between the stages (the search refuses such runs; a report
        on one says so loudly)."""
        seen: dict[str, list[str]] = {}
        if self.model_version:
            seen.setdefault(self.model_version, []).append("search")
        for s in self.stages:
            for v in s.model_versions:
                seen.setdefault(v, []).append(s.name)
        if len(seen) <= 1:
            return []
        return [f"model_version {v} used by: {', '.join(sorted(set(names)))}" for v, names in seen.items()]


def resolve_url(url: str, base_dir: str) -> str:
    """``url`` as written in a manifest: absolute URLs as they are, relative ones against ``base_dir``."""
    if "://" in url or url.startswith("/"):
        return url
    return fsio.join(base_dir, url)


def _read_manifest(output_url: str, stage: str, what: str) -> dict[str, Any]:
    """An upstream stage's manifest (:func:`retrieval.outputs.read`); missing: ``<what> manifest not found``."""
    try:
        return outputs.read(output_url, stage)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} manifest not found: {outputs.marker_url(output_url)}") from None


def read_results_manifest(results_url: str) -> dict[str, Any]:
    """The search output's manifest; a clear error when it is missing (the search did not
    finish: the manifest is written last) or is not a search manifest."""
    from retrieval.search.results import read_results_manifest as read_manifest

    return read_manifest(results_url, hint=" (--results must be a complete search output, or a pdq match "
                                           "output: the stage writes its manifest last)")


def _listed_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    for key in ("files", "parts", "shards"):
        entries = manifest.get(key)
        if isinstance(entries, list) and entries and all(isinstance(e, dict) and "file" in e for e in entries):
            return entries
    return []


def result_files(results_url: str, manifest: dict[str, Any], verify: bool = True) -> list[str]:
    """URLs of the result Parquet files, checked against the manifest when it lists them
    (presence and sha256)."""
    listed = _listed_files(manifest)
    if listed:
        urls = [resolve_url(str(e["file"]), results_url) for e in listed]
        for e, url in zip(listed, urls):
            if not fsio.exists(url):
                raise FileNotFoundError(f"result file {url} listed in {outputs.MARKER} is missing")
            if verify and e.get("sha256") and fsio.sha256_file(url) != e["sha256"]:
                raise ValueError(f"result file {url} does not match the sha256 in its manifest "
                                 "(truncated or altered)")
        return urls
    fs, root = fsio.url_to_fs(results_url)
    files = sorted(fs.glob(f"{root.rstrip('/')}/part-*.parquet"))
    urls = [fsio.to_url(fs, p) for p in files]
    rows = (manifest.get("counts") or {}).get("rows")
    if not urls and rows:
        raise FileNotFoundError(f"{results_url}: the manifest counts {rows} result rows but there is "
                                "no part-*.parquet file")
    return urls


def check_result_schema(url: str) -> int:
    """Number of rows of one result file; a clear error naming the file if a column is missing."""
    fs, path = fsio.url_to_fs(url)
    try:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            rows = pf.metadata.num_rows
    except Exception as exc:
        raise ValueError(f"result file {url} is not readable Parquet: {exc.__class__.__name__}: {exc}") from None
    missing = [c for c in RESULT_REQUIRED if c not in names]
    if missing:
        raise ValueError(f"result file {url}: missing column(s) {missing}; found {names}")
    return rows


def error_samples(output_url: str, manifest: dict[str, Any], limit: int) -> list[tuple[str, str, str]]:
    """Up to ``limit`` error rows ``(image_id, uri, error)`` of an extraction output, reading
    only as many error files (and rows) as needed."""
    if limit <= 0:
        return []
    files = [s.get("errors_file") for s in manifest.get("shards") or [] if isinstance(s, dict)
             and s.get("errors") and s.get("errors_file")]
    if files:
        urls = [resolve_url(str(f), output_url) for f in files]
    else:
        fs, root = fsio.url_to_fs(output_url)
        urls = [fsio.to_url(fs, p) for p in sorted(fs.glob(f"{root.rstrip('/')}/errors/part-*.parquet"))]
    out: list[tuple[str, str, str]] = []
    for url in urls:
        fs, path = fsio.url_to_fs(url)
        try:
            with fs.open(path, "rb") as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=limit, columns=["image_id", "uri", "error"]):
                    d = batch.to_pydict()
                    out += [(str(i), str(u), str(e)) for i, u, e in zip(d["image_id"], d["uri"], d["error"])]
                    break
        except Exception as exc:
            out.append(("", url, f"unreadable errors file: {exc.__class__.__name__}: {exc}"))
        if len(out) >= limit:
            break
    return out[:limit]


def _extract_info(name: str, url: str | None, errors_shown: int) -> StageInfo:
    info = StageInfo(name=name, url=url)
    if not url:
        info.available, info.problem = False, "not named in the search manifest"
        return info
    try:
        m = _read_manifest(url, "extract", name)
    except (FileNotFoundError, ValueError) as exc:
        info.available, info.problem = False, str(exc)
        return info
    counts = m.get("counts") or {}
    info.counts = {k: counts.get(k) for k in ("inputs", "ok", "errors") if k in counts}
    info.timings = m.get("timings") or {}
    if m.get("model_version"):
        info.model_versions = [str(m["model_version"])]
    info.details = {"outputs": 1, "storage": m.get("storage"), "engine": m.get("engine")}
    info.error_samples = error_samples(url, m, errors_shown)
    if m.get("input"):
        info.inputs = [str(m["input"])]     # as the extraction was given it (a relative path: its cwd)
    return info


def _gallery_stage(index_manifest: dict[str, Any] | None,
                   errors_shown: int) -> StageInfo:
    """All gallery extraction outputs the index was built from, summed."""
    info = StageInfo(name="gallery extract", url=None)
    if index_manifest is None:
        info.available, info.problem = False, "index manifest unavailable"
        return info
    parents: list[str] = []
    for f in index_manifest.get("feature_files") or []:
        u = f.get("url") if isinstance(f, dict) else f
        if not u:
            continue
        # as the search reads them (retrieval.index.store.feature_file_urls): a relative URL is as the
        # index was given it (relative to the working directory), not to the index folder
        parent = posixpath.dirname(str(u))
        if parent not in parents:
            parents.append(parent)
    if not parents:
        info.available, info.problem = False, "the index manifest lists no feature_files"
        return info
    with ThreadPoolExecutor(max_workers=min(8, len(parents))) as pool:
        # most recent outputs first: their error rows are the ones worth showing
        stages = list(pool.map(lambda p: _extract_info("gallery extract", p, errors_shown), parents[::-1]))
    ok = [s for s in stages if s.available]
    info.url = parents[-1] if len(parents) == 1 else f"{len(parents)} outputs, latest {parents[-1]}"
    if not ok:
        info.available, info.problem = False, stages[0].problem
        return info
    for key in ("inputs", "ok", "errors"):
        info.counts[key] = sum(int(s.counts.get(key) or 0) for s in ok)
    info.timings = {"total_s": round(sum(float(s.timings.get("total_s") or 0.0) for s in ok), 3)}
    info.model_versions = sorted({v for s in ok for v in s.model_versions})
    info.details = {"outputs": len(parents), "outputs_unavailable": len(parents) - len(ok)}
    missing = [s.problem for s in stages if not s.available]
    if missing:
        info.problem = f"{len(missing)} of {len(parents)} gallery outputs unavailable, e.g. {missing[0]}"
    info.inputs = list(dict.fromkeys(u for s in ok for u in s.inputs))
    for s in ok:
        info.error_samples += s.error_samples[: max(0, errors_shown - len(info.error_samples))]
    return info


INDEX_DETAILS = ("index_key", "nlist", "pq_bytes", "metric", "ntotal", "nprobe", "bytes_per_vector",
                 "vectors_per_shard", "train_sample_size")
INDEX_QUALITY = ("recall@10", "recall@100", "source_hit@100")


def _index_stage(index: StageInfo, m: dict[str, Any]) -> None:
    """inputs = gallery rows offered over all builds, ok = vectors in the index, errors = rows
    skipped (duplicates, NaN/inf, zero vectors)."""
    builds = [b for b in m.get("builds") or [] if isinstance(b, dict)]
    skipped = m.get("skipped") if isinstance(m.get("skipped"), dict) else {}
    counts: dict[str, Any] = {}
    if builds:
        counts["inputs"] = sum(int(b.get("rows") or 0) for b in builds)
    if isinstance(m.get("ntotal"), int):
        counts["ok"] = m["ntotal"]
    if skipped:
        counts["errors"] = sum(int(skipped.get(k) or 0) for k in ("duplicates", "nan_inf", "zero"))
    if isinstance(m.get("counts"), dict):
        counts.update({k: v for k, v in m["counts"].items() if isinstance(v, (int, float))})
    index.counts = counts
    index.timings = m.get("timings") or {}
    if m.get("model_version"):
        index.model_versions = [str(m["model_version"])]
    index.details = {k: m[k] for k in INDEX_DETAILS if m.get(k) is not None}
    if isinstance(m.get("shards"), list):
        index.details["shards"] = len(m["shards"])
    if builds:
        index.details["builds"] = len(builds)
    quality = m.get("quality")
    if isinstance(quality, dict):
        index.details.update({f"quality {k}": quality[k] for k in INDEX_QUALITY
                              if isinstance(quality.get(k), (int, float))})


def gather(results_url: str, errors_shown: int = 20, verify: bool = True) -> RunInfo:
    """Read the search manifest (required) and every upstream manifest (optional)."""
    manifest = read_results_manifest(results_url)
    files = result_files(results_url, manifest, verify=verify)
    counts = manifest.get("counts") or {}
    search = StageInfo(name="search", url=results_url,
                       counts={k: counts.get(k) for k in ("queries", "query_errors", "queries_with_results", "rows")
                               if k in counts},
                       timings=manifest.get("timings") or {})
    search.details = {"index": manifest.get("index"), "queries": manifest.get("queries")}
    params = manifest.get("params")
    if isinstance(params, dict):
        search.details.update({f"param.{k}": v for k, v in params.items() if isinstance(v, (int, float, str))
                               or v is None})
        if isinstance(params.get("normalize"), dict):      # score normalisation: background, size, k, beta
            search.details.update({f"param.normalize.{k}": v for k, v in params["normalize"].items()})
    query = _extract_info("query extract", manifest.get("query_features"), errors_shown)

    index_url = manifest.get("index")
    index = StageInfo(name="index", url=index_url)
    index_manifest: dict[str, Any] | None = None
    if not index_url:
        index.available, index.problem = False, "not named in the search manifest"
    else:
        try:
            index_manifest = _read_manifest(index_url, "index", "index")
        except (FileNotFoundError, ValueError) as exc:
            index.available, index.problem = False, str(exc)
    if index_manifest is not None:
        _index_stage(index, index_manifest)
    gallery = _gallery_stage(index_manifest, errors_shown)
    return RunInfo(results_url=results_url, manifest=manifest, result_files=files,
                   stages=[gallery, index, query, search])


def compact(obj: Any, max_len: int = 200) -> Any:
    """A JSON-able copy with long strings cut (for summary.json, which must stay small)."""
    if isinstance(obj, str):
        return obj if len(obj) <= max_len else obj[: max_len - 3] + "..."
    if isinstance(obj, dict):
        return {str(k): compact(v, max_len) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [compact(v, max_len) for v in obj]
    if isinstance(obj, (int, float, bool)) or obj is None:
        return obj
    return compact(str(obj), max_len)
