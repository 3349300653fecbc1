"""Score normalisation against a background set (``search.normalize``).

A raw cosine means different things for different queries: a busy photo sits close to many
unrelated images, a plain one to few. Subtracting each query's *background level* - the mean of its
top ``k`` cosines to a set of unrelated images, times ``beta`` - makes scores comparable across
queries, which a single report threshold and micro-AP both need (the ISC2021 descriptor track's
score normalisation; SSCD's README recommends it). The ranking within a query is unchanged (one
constant per query). The result rows keep the raw ``score`` and add ``norm_score``.

The background is the fine (512-d) descriptors of either a feature output of unrelated images
(``retrieval extract --role gallery``, same ``model_version`` as the index) or a uniform sample of
the gallery itself (``gallery``: refused unless the gallery is >= 100x the sample, so that a query's
own source is rarely in it). The set is loaded once on the driver and shipped with the job.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from retrieval import fsio
from retrieval.schema import fine_matrix

log = logging.getLogger(__name__)

GALLERY = "gallery"
MIN_GALLERY_RATIO = 100     # background=gallery: the gallery must hold >= this x the sample
_BLOCK = 4096               # queries scored per matrix product (bounds memory: block x background)


@dataclass(frozen=True)
class Background:
    """The background set's fine vectors (float32, L2-normalised) and the normalisation settings."""
    vectors: np.ndarray
    k: int
    beta: float
    source: str

    def describe(self) -> dict:
        return {"background": self.source, "background_size": int(self.vectors.shape[0]),
                "k": self.k, "beta": self.beta}


def score_column(search_manifest: dict) -> str:
    """The score a search output is judged by: ``norm_score`` when it normalised its scores (its
    manifest's ``params.normalize``), else the raw cosine ``score`` (evaluate and report)."""
    return "norm_score" if (search_manifest.get("params") or {}).get("normalize") else "score"


def background_level(query_fine: np.ndarray, background: np.ndarray, k: int) -> np.ndarray:
    """Per query, the mean of its ``k`` highest cosines to ``background`` (float32, ``nq``)."""
    nq = query_fine.shape[0]
    out = np.zeros(nq, np.float32)
    if nq == 0 or background.shape[0] == 0:
        return out
    import faiss

    k = min(k, background.shape[0])
    q = np.ascontiguousarray(query_fine, dtype=np.float32)
    for a in range(0, nq, _BLOCK):     # faiss: blocked sgemm + top-k heap (2x numpy's matmul + partition)
        sims, _ = faiss.knn(q[a:a + _BLOCK], background, k, metric=faiss.METRIC_INNER_PRODUCT)
        out[a:a + _BLOCK] = sims.mean(axis=1)
    return out


def normalized(scores: np.ndarray, query_fine: np.ndarray, bg: Background) -> np.ndarray:
    """``scores`` (nq x k, raw cosines) minus ``beta`` x each query's background level."""
    level = background_level(query_fine, bg.vectors, bg.k)
    return (scores - np.float32(bg.beta) * level[:, None]).astype(np.float32)


def _from_features(url: str, model_version: str | None) -> np.ndarray:
    from retrieval.extract.features import read_features, read_manifest

    manifest = read_manifest(url)
    bg_version = manifest.get("model_version")
    if model_version is not None and bg_version != model_version:
        raise ValueError(f"search.normalize.background {url} was extracted with model_version "
                         f"{bg_version}, the index with {model_version}: extract the background "
                         "set with the index's model")
    table = read_features(url, ["fine", "fine_scale"] if manifest.get("storage") == "int8" else ["fine"])
    if table.num_rows == 0:
        raise ValueError(f"search.normalize.background {url} holds no feature rows")
    return fine_matrix(table)


def _from_gallery(index_manifest: dict, feature_urls: list[str], sample: int, seed: int) -> np.ndarray:
    rows = [int(f.get("rows") or 0) for f in index_manifest["feature_files"]]
    total = sum(rows)
    if total < MIN_GALLERY_RATIO * sample:
        raise ValueError(f"search.normalize.background=gallery needs a gallery of at least "
                         f"{MIN_GALLERY_RATIO} x search.normalize.sample = {MIN_GALLERY_RATIO * sample:,} "
                         f"images (this one has {total:,}): a sample of a small gallery holds the "
                         "queries' own sources; give a feature output of unrelated images instead")
    return sample_rows(feature_urls, rows, sample, seed)


def sample_rows(urls: list[str], rows: list[int], sample: int, seed: int) -> np.ndarray:
    """The fine vectors (float32) of ``sample`` rows drawn uniformly without replacement (seeded)
    from the feature files ``urls`` holding ``rows`` rows each (all rows when fewer)."""
    total = sum(rows)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(sample, total), replace=False))
    starts = np.cumsum([0] + list(rows))
    parts = []
    for f, url in enumerate(urls):
        mine = chosen[(chosen >= starts[f]) & (chosen < starts[f + 1])] - starts[f]
        if not len(mine):
            continue
        pf = fsio.parquet_file(url)
        cols = [c for c in ("fine", "fine_scale") if c in pf.schema_arrow.names]
        parts.append(fine_matrix(pf.read(columns=cols).take(mine)))
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)


def load_background(cfg_normalize, index_manifest: dict, feature_urls: list[str]) -> Background | None:
    """The background of ``search.normalize`` (None when off), checked against the index's model."""
    source = cfg_normalize["background"]
    if not source:
        return None
    if source == GALLERY:
        vectors = _from_gallery(index_manifest, feature_urls, int(cfg_normalize["sample"]),
                                int(cfg_normalize["seed"]))
    else:
        vectors = _from_features(source, index_manifest.get("model_version"))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)
    log.info("score normalisation: %d background vectors from %s, k %d, beta %g", len(vectors), source,
             cfg_normalize["k"], cfg_normalize["beta"])
    return Background(vectors=vectors, k=int(cfg_normalize["k"]), beta=float(cfg_normalize["beta"]),
                      source=source)
