"""Synthetic gallery/query descriptors for benchmarks and scale tests (fixed seed, no images).

How they are made (README "Benchmarks"):
- Items are clustered, as real galleries are (near-duplicates, series, similar scenes):
  ``n_clusters`` centres on the 512-d sphere; an item's latent is ``centre + spread * noise``.
- ``fine`` (512-d) = the item's normalised latent.
- ``coarse`` (128-d) is a noisy, lossy view of the same item, as a real coarse code is:
  ``normalise(P @ fine + coarse_noise * noise)`` with one fixed random 128 x 512 projection ``P``.
- A matching query is a perturbed copy of a gallery item: ``fine_q = normalise(fine_g + copy_noise
  * noise)`` and its coarse code is computed from ``fine_q`` the same lossy way (plus its own
  noise). A non-matching query is a fresh item from the same cluster distribution.
Generation is chunked so 10^7 items fit in memory (float32 only), and deterministic per chunk.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import fsio
from retrieval.schema import (DICTIONARY_COLUMNS, feature_compression, feature_schema, int8_to_arrow,
                              quantize_int8, vectors_to_arrow)

FINE_DIM, COARSE_DIM = 512, 128
CHUNK = 100_000


@dataclass(frozen=True)
class SyntheticSpec:
    n_clusters: int = 10_000
    spread: float = 0.3          # item spread around its cluster centre (relative to the centre norm)
    coarse_noise: float = 0.5    # how lossy the coarse view is
    copy_noise: float = 0.5      # how far a query copy is from its source (fine space)
    seed: int = 0


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def _projection(spec: SyntheticSpec) -> np.ndarray:
    rng = np.random.default_rng([spec.seed, 1])
    return (rng.standard_normal((FINE_DIM, COARSE_DIM)) / np.sqrt(COARSE_DIM)).astype(np.float32)


def _centres(spec: SyntheticSpec) -> np.ndarray:
    rng = np.random.default_rng([spec.seed, 2])
    return _normalise(rng.standard_normal((spec.n_clusters, FINE_DIM)).astype(np.float32))


def _coarse_of(fine: np.ndarray, rng: np.random.Generator, spec: SyntheticSpec, proj: np.ndarray) -> np.ndarray:
    noise = rng.standard_normal((fine.shape[0], COARSE_DIM)).astype(np.float32) / np.sqrt(COARSE_DIM)
    return _normalise(fine @ proj + spec.coarse_noise * noise)


def _items(n: int, rng: np.random.Generator, spec: SyntheticSpec, centres: np.ndarray) -> np.ndarray:
    which = rng.integers(0, spec.n_clusters, n)
    noise = rng.standard_normal((n, FINE_DIM)).astype(np.float32) / np.sqrt(FINE_DIM)
    return _normalise(centres[which] + spec.spread * noise)


def gallery_chunks(n: int, spec: SyntheticSpec = SyntheticSpec(), first: int = 0
                   ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, coarse, fine)`` chunks of rows ``[first, n)`` of the gallery (float32,
    L2-normalised); ``first`` is a multiple of ``CHUNK``, so any range is the same rows as the whole."""
    if first % CHUNK:
        raise ValueError(f"first={first} is not a multiple of the chunk size {CHUNK}")
    proj, centres = _projection(spec), _centres(spec)
    for start in range(first, n, CHUNK):
        m = min(CHUNK, n - start)
        rng = np.random.default_rng([spec.seed, 3, start])
        fine = _items(m, rng, spec, centres)
        yield start, _coarse_of(fine, rng, spec, proj), fine


def gallery(n: int, spec: SyntheticSpec = SyntheticSpec()) -> tuple[np.ndarray, np.ndarray]:
    coarse = np.empty((n, COARSE_DIM), np.float32)
    fine = np.empty((n, FINE_DIM), np.float32)
    for start, c, f in gallery_chunks(n, spec):
        coarse[start:start + len(c)], fine[start:start + len(f)] = c, f
    return coarse, fine


def gallery_rows(n: int, index: np.ndarray, spec: SyntheticSpec = SyntheticSpec()) -> np.ndarray:
    """The fine vectors of the given gallery rows, regenerated chunk by chunk (no full gallery)."""
    index = np.asarray(index)
    out = np.empty((len(index), FINE_DIM), np.float32)
    for start, _, f in gallery_chunks(n, spec):
        sel = (index >= start) & (index < start + len(f))
        out[sel] = f[index[sel] - start]
    return out


def queries(n_gallery: int, n_match: int, n_nomatch: int, spec: SyntheticSpec = SyntheticSpec()
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(coarse, fine, source)``: ``source[i]`` is the gallery row a query copies, or -1."""
    rng = np.random.default_rng([spec.seed, 4])
    source = np.sort(rng.choice(n_gallery, size=n_match, replace=False))
    src_fine = gallery_rows(n_gallery, source, spec)
    noise = rng.standard_normal(src_fine.shape).astype(np.float32) / np.sqrt(FINE_DIM)
    fine_m = _normalise(src_fine + spec.copy_noise * noise)
    fine_n = _items(n_nomatch, rng, spec, _centres(spec))
    fine = np.concatenate([fine_m, fine_n])
    coarse = _coarse_of(fine, rng, spec, _projection(spec))
    return coarse, fine, np.concatenate([source, -np.ones(n_nomatch, dtype=np.int64)])


def image_id(i: int) -> str:
    return f"img{i:010d}"


def write_feature_output(url: str, coarse: np.ndarray, fine: np.ndarray, *, num_files: int = 8,
                         storage: str = "int8", role: str = "gallery", id_prefix: str = "img",
                         model_version: str = "synthetic-v1", row_group_size: int = 1024,
                         start: int = 0, regions: list | None = None) -> dict:
    """Write vectors as a complete extraction output (feature shards + errors + manifest), exactly
    the layout ``retrieval extract`` writes, so every later stage reads them unchanged. Row ``i`` of
    the input gets ``image_id = f"{id_prefix}{start + i:010d}"``; files are contiguous slices.
    ``regions`` (query role): a region label per row, None for a whole image: a region row belongs
    to the image of the row before it (its image_id), as ``extract.query_regions`` writes them."""
    t0 = time.monotonic()
    n = len(coarse)
    schema = feature_schema(coarse.shape[1], fine.shape[1], storage, regions=regions is not None)
    owner = np.arange(n)
    if regions is not None:      # each row's image: the last whole-image row at or before it
        whole = np.flatnonzero([r is None for r in regions])
        owner = whole[np.searchsorted(whole, np.arange(n), side="right") - 1]
    bounds = np.linspace(0, n, num_files + 1).astype(int)
    if regions is not None:      # files cut at whole-image rows
        bounds = np.array([int(owner[min(b, n - 1)]) if b < n else n for b in bounds])
    shards = []
    for k in range(num_files):
        a, b = bounds[k], bounds[k + 1]
        ids = [f"{id_prefix}{start + int(owner[i]):010d}" for i in range(a, b)]
        cols = {"image_id": ids, "uri": [f"synthetic://{role}/{i}" for i in ids],
                "coarse": vectors_to_arrow(coarse[a:b])}
        if storage == "int8":
            q, s = quantize_int8(fine[a:b])
            cols["fine"] = int8_to_arrow(q)
            cols["fine_scale"] = pa.array(s, pa.float32())
        else:
            cols["fine"] = vectors_to_arrow(fine[a:b].astype(np.float32))
        cols.update({"width": pa.array(np.full(b - a, 224, np.int32)),
                     "height": pa.array(np.full(b - a, 224, np.int32)),
                     "model_version": [model_version] * (b - a), "role": [role] * (b - a)})
        if regions is not None:
            cols["region"] = pa.array(regions[a:b], pa.string())
        name = f"part-{k:05d}"
        part_url = fsio.join(url, f"{name}.parquet")
        with fsio.atomic_open(part_url, "wb") as fh:
            pq.write_table(pa.table(cols, schema=schema), fh, row_group_size=row_group_size,
                           compression=feature_compression(schema), use_dictionary=DICTIONARY_COLUMNS)
        err_url = fsio.join(url, "errors", f"{name}.parquet")
        with fsio.atomic_open(err_url, "wb") as fh:
            pq.write_table(pa.table({"image_id": pa.array([], pa.string()), "uri": pa.array([], pa.string()),
                                     "error": pa.array([], pa.string())}), fh)
        shards.append({"shard": k, "file": f"{name}.parquet", "errors_file": f"errors/{name}.parquet",
                       "inputs": int(b - a), "ok": int(b - a), "errors": 0,
                       "sha256": fsio.sha256_file(part_url), "errors_sha256": fsio.sha256_file(err_url)})
    manifest = {"stage": "extract", "role": role, "input": "synthetic", "output": url,
                "model_version": model_version, "storage": storage, "heads": "synthetic",
                "counts": {"inputs": n, "ok": n, "errors": 0, "shards": num_files},
                "shards": shards, "config": {"synthetic": True},
                **({"query_regions": sorted({r.split(":")[0] for r in regions if r})} if regions is not None else {}),
                "timings": {"total_s": round(time.monotonic() - t0, 3)},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fsio.write_json(fsio.join(url, "_manifest.json"), manifest)
    return json.loads(json.dumps(manifest))
