"""Estimated false-match rates from the background set (``fmr``, ``fmr_query``; docs/quality.md).

A normalised score means little to a reviewer; "one unrelated image in 50,000 scores this high
against a query like this one" does. With ``search.normalize.background`` set, the search measures
the score distribution of unrelated pairs and every result row carries two rates:

- ``fmr``: the estimated probability that ONE unrelated gallery image scores >= the row's score
  against the query (a per-comparison tail rate, on the score the row is judged by: ``norm_score``);
- ``fmr_query``: the estimated probability that at least one of the gallery's ``G`` images scores
  >= it when none is related: ``1 - (1 - fmr) ** (G x R)`` (``R`` regions searched per query,
  1 today; ~ ``G x R x fmr`` when small), i.e. the false-match rate per query at this threshold.

**The null sample** (:func:`null_scores`): up to ``search.normalize.fmr_queries`` of the search's
own query vectors (a uniform, seeded sample) against every background vector, each pair scored as
the search scores a match: cosine - ``beta`` x the query's background level, the level computed
leave-one-out (without the pair's background image, from the top ``k + 1``), so a background image
is scored as an outside image would be. ``N = queries x background`` pairs.

**The estimate** (:func:`fit`, :class:`NullTail`): the empirical survival function of the ``N``
scores, kept as ~10 points per decade from 1 down to ``MIN_EXCEEDANCES / N`` (the smallest rate
still seen ``MIN_EXCEEDANCES`` times; between points log-survival is linear in the score). Above
that point (the ``MIN_EXCEEDANCES``-th highest null score) the rate is extrapolated with an
exponential tail, ``p_a x exp(-(s - s_a) / sigma)``, ``sigma`` the mean excess of the top
``TAIL_FIT`` scores over the lowest of them (the maximum-likelihood exponential, i.e. a GPD of shape
0). Cosines are bounded, so the true tail is lighter than exponential far out: the extrapolation
overstates small rates (a conservative estimate: a threshold chosen from it tends to flag less than
the target would allow). The function is continuous and non-increasing in the score.

The whole estimate is a few hundred numbers, kept in the search manifest (``calibration``), so the
report reads it without the background.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_EXCEEDANCES = 10          # the empirical estimate is used while >= this many null pairs score above
TAIL_FIT = 200                # the exponential tail is fitted to the top this many null scores
POINTS_PER_DECADE = 10        # survival points kept per decade of the rate
_BLOCK = 1024                 # null queries scored per matrix product


def null_scores(query_fine: np.ndarray, background: np.ndarray, k: int, beta: float) -> np.ndarray:
    """The normalised score of every (query, background image) pair (float32, ``nq x nb``
    flattened), the query's background level taken leave-one-out: the mean of its top ``k``
    cosines to the OTHER background images."""
    q = np.ascontiguousarray(query_fine, dtype=np.float32)
    b = np.ascontiguousarray(background, dtype=np.float32)
    nq, nb = q.shape[0], b.shape[0]
    if nq == 0 or nb < 2:
        return np.zeros(0, np.float32)
    k = min(k, nb - 1)
    out = np.empty((nq, nb), np.float32)
    for a in range(0, nq, _BLOCK):
        sims = q[a:a + _BLOCK] @ b.T
        top = -np.sort(-np.partition(sims, nb - k - 1, axis=1)[:, nb - k - 1:], axis=1)   # top k+1, descending
        level_in = top[:, :k].mean(axis=1)                         # the level with every image
        # without image j: when j is among the top k, its cosine is swapped for the (k+1)-th
        level_out = (top[:, :k].sum(axis=1)[:, None] - sims + top[:, k][:, None]) / k
        level = np.where(sims >= top[:, k - 1][:, None], level_out, level_in[:, None])
        out[a:a + _BLOCK] = sims - np.float32(beta) * level
    return out.ravel()


@dataclass(frozen=True)
class NullTail:
    """The survival function of unrelated pairs' scores: ``points`` (score ascending, log10 rate
    descending) down to the anchor, then the exponential tail (``sigma``)."""
    scores: tuple[float, ...]
    log10_rates: tuple[float, ...]
    sigma: float
    pairs: int
    null_queries: int
    background: int
    gallery: int
    regions: int = 1

    @property
    def anchor(self) -> tuple[float, float]:
        """The last empirical point ``(score, rate)``: above it the rate is extrapolated."""
        return self.scores[-1], 10.0 ** self.log10_rates[-1]

    @property
    def resolution(self) -> float:
        """``1 / N``: the smallest rate a null pair could show at all."""
        return 1.0 / self.pairs

    def fmr(self, score) -> np.ndarray:
        """Per-comparison false-match rate at ``score`` (array; NaN stays NaN): with ``regions``
        query rows per image, an unrelated gallery image gets that many tries,
        ``1 - (1 - p) ** regions`` (``p``: :meth:`fmr_region`)."""
        p = self.fmr_region(score)
        if self.regions == 1:
            return p
        return -np.expm1(self.regions * np.log1p(-np.clip(p, 0.0, 1.0)))

    def fmr_region(self, score) -> np.ndarray:
        """False-match rate of ONE (query row, gallery image) comparison at ``score``."""
        s = np.asarray(score, dtype=np.float64)
        xs, ys = np.asarray(self.scores), np.asarray(self.log10_rates)
        s_a, p_a = self.anchor
        emp = 10.0 ** np.interp(s, xs, ys, left=0.0)
        with np.errstate(over="ignore", invalid="ignore"):
            ext = p_a * np.exp(-(s - s_a) / self.sigma)
        return np.where(s > s_a, ext, emp)

    def fmr_query(self, score) -> np.ndarray:
        """Per-query false-match rate at ``score``: ``1 - (1 - fmr) ** (gallery x regions)``."""
        p = np.clip(self.fmr_region(score), 0.0, 1.0)
        with np.errstate(divide="ignore"):
            return -np.expm1(self.gallery * self.regions * np.log1p(-p))

    def threshold(self, target_query_rate: float) -> float:
        """The lowest score whose per-query false-match rate is <= ``target_query_rate``."""
        if not 0.0 < target_query_rate < 1.0:
            raise ValueError(f"a target false-match rate per query must be in (0, 1), got {target_query_rate}")
        p = -math.expm1(math.log1p(-target_query_rate) / (self.gallery * self.regions))   # per comparison
        s_a, p_a = self.anchor
        if p <= p_a:
            return float(s_a + self.sigma * math.log(p_a / p))
        xs, ys = np.asarray(self.scores), np.asarray(self.log10_rates)
        return float(np.interp(math.log10(p), ys[::-1], xs[::-1]))

    def describe(self) -> dict:
        """The manifest's ``calibration`` entry (all the report needs; full precision, so the report
        computes the very rates the rows carry)."""
        s_a, p_a = self.anchor
        return {"method": "pooled null of (query sample x background) normalised scores; empirical survival "
                          f"down to {MIN_EXCEEDANCES} exceedances, exponential tail beyond",
                "scores": [float(x) for x in self.scores], "log10_rates": [float(y) for y in self.log10_rates],
                "sigma": float(self.sigma), "anchor_score": float(s_a), "anchor_rate": p_a,
                "pairs": self.pairs, "resolution": self.resolution, "null_queries": self.null_queries,
                "background": self.background, "gallery": self.gallery, "regions": self.regions}

    @classmethod
    def from_manifest(cls, d: dict) -> "NullTail":
        try:
            return cls(scores=tuple(float(x) for x in d["scores"]),
                       log10_rates=tuple(float(y) for y in d["log10_rates"]), sigma=float(d["sigma"]),
                       pairs=int(d["pairs"]), null_queries=int(d["null_queries"]),
                       background=int(d["background"]), gallery=int(d["gallery"]),
                       regions=int(d.get("regions", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the search manifest's calibration entry is malformed ({exc!r})") from None


def fit(null: np.ndarray, gallery: int, null_queries: int, background: int, regions: int = 1) -> NullTail:
    """The :class:`NullTail` of the null scores ``null`` (see the module's text)."""
    x = np.sort(np.asarray(null, dtype=np.float64)[np.isfinite(null)])[::-1]      # descending
    n = x.size
    if n < 2 * MIN_EXCEEDANCES:
        raise ValueError(f"{n} null pairs are too few to estimate false-match rates (need "
                         f">= {2 * MIN_EXCEEDANCES}: more queries or a larger background)")
    if gallery < 1:
        raise ValueError("false-match rates need a gallery of at least one image")
    # empirical survival at log-spaced rates: rate r <-> the ceil(r n)-th highest score
    lowest = math.log10(MIN_EXCEEDANCES / n)
    levels = np.concatenate([np.arange(0.0, lowest, -1.0 / POINTS_PER_DECADE), [lowest]])
    counts = np.unique(np.clip(np.ceil(10.0 ** levels * n).astype(np.int64), MIN_EXCEEDANCES, n))[::-1]
    pts: dict[float, int] = {}
    for s in x[counts - 1]:
        pts[float(s)] = int(np.searchsorted(-x, -s, side="right"))    # #{null >= s}, ties counted
    xs = np.array(sorted(pts))
    ys = np.log10(np.array([pts[s] for s in xs]) / n)
    top = x[:min(TAIL_FIT, n)]
    sigma = max(float(np.mean(top[:-1] - top[-1])), 1e-6)     # mean excess over the lowest of the top
    return NullTail(scores=tuple(xs.tolist()), log10_rates=tuple(ys.tolist()), sigma=sigma, pairs=int(n),
                    null_queries=int(null_queries), background=int(background), gallery=int(gallery),
                    regions=int(regions))


def for_search(background, query_files: list[str], query_rows: list[int], sample: int, seed: int,
               gallery: int, regions: int = 1) -> tuple[NullTail | None, str | None]:
    """The search's estimate (``background``: its :class:`~retrieval.search.normalize.Background`)
    from a seeded sample of ``sample`` of its queries; ``(None, why)`` when there is nothing to
    estimate from (no background, no queries, too few pairs)."""
    from retrieval.search.normalize import sample_rows

    if background is None:
        return None, "no background (search.normalize.background)"
    if not sum(query_rows):
        return None, "no queries"
    queries = sample_rows(list(query_files), list(query_rows), sample, seed)
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    queries = queries / np.maximum(norms, 1e-12)
    null = null_scores(queries, background.vectors, background.k, background.beta)
    try:
        return fit(null, gallery, len(queries), len(background.vectors), regions), None
    except ValueError as exc:
        return None, str(exc)
