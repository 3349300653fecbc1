"""Geometric verification of a query's top matches with local features (``search.geometric``; opt-in).

For each result row among a query's first ``top`` ranks, the query image and the gallery image
(read from ``query_uri`` / ``gallery_uri`` through fsspec, EXIF-oriented, grey, longer side at most
``max_side``) are described by local features (OpenCV ORB, or SIFT), matched (two nearest
neighbours, Lowe's ratio test) and a RANSAC homography (or partial affine) is fitted: its inlier
count goes to the ``inliers`` column. With ``flip`` the mirrored query is matched too (a mirrored
copy has no geometric model otherwise) and the larger count kept; with ``regions`` a row that came
from a query region (``query_region``) also matches that region, cropped at full resolution.

The count is combined into the score: a row with at least ``min_inliers`` inliers gains
``boost x min(inliers, cap) / cap`` on ``score`` and on ``norm_score`` (when the search normalises),
and the query's rows are re-ordered by that score (``norm_score`` first when set, as the region
merge ranks), ranks renumbered. The other rows keep their scores. ``fmr`` / ``fmr_query`` stay the
descriptor's (calibrated on ``norm_score`` before the boost). An image that cannot be read leaves
the row unverified (``inliers`` null) with the reason in ``geometric_error``: never a failed task.

Cheap by default (docs/quality.md "The cheap rule"): only rows whose ``norm_score`` (``score``
without normalisation) reaches ``gate`` are verified; a pair with fewer ratio-test matches than
``min_inliers`` skips RANSAC (``iters`` at most); with ``early`` a row stops at the first match reaching
``cap``, and the mirror and region crop are described only when a row gets that far. ``top: auto``
is off here; ``retrieval run`` turns it on (:func:`run_top`).

The pass runs in the search's write step (both engines, inside the tasks on Spark); each task keeps
the local features of the images it described in an LRU (a gallery image matched by many queries is
described once per process). Measured in docs/quality.md (tests/bench/bench_verify.py).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

GRAYS = 8          # grey images a matcher keeps (the current query's, its regions', a few gallery images)
RUN_TOP = 10       # rows per query `retrieval run` verifies by default (search.geometric.top: auto)
INSTALL_HINT = "pip install 'retrieval[verify]' (the opencv-python-headless package)"


@dataclass(frozen=True)
class Geometric:
    """The settings of ``search.geometric`` (``top`` 0: off)."""
    top: int = 0
    method: str = "orb"           # orb | sift
    model: str = "homography"     # homography | affine (partial affine: rotation, scale, shift)
    features: int = 500           # local features per image (the strongest)
    ratio: float = 0.8            # Lowe's ratio test on the two nearest neighbours
    max_side: int = 512           # images downscaled to this longer side before description
    flip: bool = True             # also match the mirrored query
    regions: bool = True          # also match the query region a row came from (query_region), cropped
    min_inliers: int = 10         # a row needs this many inliers for the boost
    boost: float = 0.8            # added to score / norm_score at cap inliers or more
    cap: int = 100                # inliers at which the boost is full
    reproj: float = 5.0           # RANSAC reprojection threshold (pixels, at max_side)
    iters: int = 500              # RANSAC iterations at most
    gate: float = 0.1             # rows whose norm_score (score without normalisation) is below: not verified
    early: bool = True            # stop a row's matches (mirror, region) once one reaches cap inliers
    cache: int = 4096             # images whose features a process keeps (LRU)

    @classmethod
    def from_config(cls, section: Any) -> "Geometric | None":
        """The settings, or None when off (``top`` 0, or ``auto``: off outside ``retrieval run``,
        :func:`run_top`)."""
        d = dict(section or {})
        if d.get("top") == "auto" or int(d.get("top") or 0) <= 0:
            return None
        fields = cls.__dataclass_fields__
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"search.geometric: unknown key(s) {unknown}; known: {sorted(fields)}")
        g = cls(**{k: type(getattr(cls, k))(v) for k, v in d.items()})
        require_cv2()
        return g

    def boosts(self, inliers: np.ndarray) -> np.ndarray:
        """The score boost of each inlier count (-1 / missing: none)."""
        n = np.asarray(inliers, np.float64)
        b = self.boost * np.minimum(n, self.cap) / max(self.cap, 1)
        return np.where(n >= self.min_inliers, b, 0.0)


def run_top(top: Any, verify: bool = True) -> int:
    """``retrieval run``'s ``search.geometric.top``: 0 without ``verify`` (``--no-verify``); else a
    number set in the configuration as it is, and ``auto`` (the default) :data:`RUN_TOP` when OpenCV
    is importable, else 0 (off, with one warning)."""
    if not verify:
        return 0
    if top != "auto":
        return int(top)
    try:
        require_cv2()
    except RuntimeError:
        log.warning("retrieval run: geometric verification (search.geometric) is skipped: OpenCV is not "
                    "installed; %s to verify the top matches (docs/search.md), or pass --no-verify "
                    "to silence this", INSTALL_HINT)
        return 0
    return RUN_TOP


def require_cv2() -> Any:
    """OpenCV's module, or a clear error naming the package to install."""
    try:
        import cv2
    except ImportError as exc:
        raise RuntimeError(f"search.geometric.top > 0 needs OpenCV, which is not installed ({exc}): "
                           f"{INSTALL_HINT}, or set search.geometric.top=0") from None
    return cv2


def load_gray(url: str, max_side: int, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The image at ``url`` as an H x W uint8 grey array, EXIF-oriented, cropped to ``box`` (relative
    x0, y0, x1, y1) when given, longer side <= max_side."""
    from PIL import Image

    from retrieval import fsio
    from retrieval.extract.preprocess import decode_image

    img, _, _ = decode_image(fsio.read_bytes(url), draft_size=None if box else max_side)
    img = img.convert("L")
    if box is not None:
        w, h = img.size
        img = img.crop((round(box[0] * w), round(box[1] * h), max(round(box[2] * w), 1), max(round(box[3] * h), 1)))
    if max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
    return np.asarray(img, np.uint8)


class Matcher:
    """Local features (cached per image) and inlier counts of image pairs, for one ``Geometric``."""

    def __init__(self, g: Geometric, reader: Callable[..., np.ndarray] = load_gray):
        cv2 = require_cv2()
        self.g, self.cv2, self.reader = g, cv2, reader
        if g.method == "sift":
            self.detector = cv2.SIFT_create(nfeatures=g.features)
            self.matcher = cv2.BFMatcher(cv2.NORM_L2)
        else:
            self.detector = cv2.ORB_create(nfeatures=g.features)
            self.matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        self.cache: OrderedDict = OrderedDict()
        self.grays: OrderedDict = OrderedDict()
        self.described = 0

    def _describe(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        kp, desc = self.detector.detectAndCompute(gray, None)
        xy = np.array([k.pt for k in kp], np.float32).reshape(-1, 2)
        return xy, desc

    @staticmethod
    def _cached(cache: OrderedDict, size: int, key: tuple, make: Callable[[], Any]) -> Any:
        got = cache.get(key)
        if got is not None:
            cache.move_to_end(key)
            return got
        got = cache[key] = make()
        while len(cache) > size:
            cache.popitem(last=False)
        return got

    def gray(self, uri: str, region: str | None = None) -> np.ndarray:
        """The image (or its ``region``, a query region label, cropped) grey; the last few kept (a
        query's rows come together: its mirror and regions do not read it again)."""
        def read() -> np.ndarray:
            self.described += 1
            return self.reader(uri, self.g.max_side, *([_box(region)] if region else []))
        return self._cached(self.grays, GRAYS, (uri, region), read)

    def features(self, uri: str, mirror: bool = False, region: str | None = None) -> tuple:
        """``(xy, descriptors)`` of the image (of its mirror with ``mirror``), or of its ``region``
        cropped, through the LRU (the mirror is described only when asked for); raises on an
        unreadable image (the caller records it)."""
        def make() -> tuple:
            gray = self.gray(uri, region)
            return self._describe(np.ascontiguousarray(gray[:, ::-1]) if mirror else gray)
        return self._cached(self.cache, self.g.cache, (uri, mirror, region), make)

    def count(self, a: tuple[np.ndarray, np.ndarray | None], b: tuple[np.ndarray, np.ndarray | None]) -> int:
        """RANSAC inliers between two described images (0 when too few matches)."""
        (xa, da), (xb, db) = a, b
        if da is None or db is None or len(da) < 2 or len(db) < 2:
            return 0
        pairs = self.matcher.knnMatch(da, db, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < self.g.ratio * p[1].distance]
        if len(good) < max(4 if self.g.model == "homography" else 3, self.g.min_inliers):
            return 0                    # RANSAC skipped: the row cannot reach min_inliers
        src = xa[[m.queryIdx for m in good]].reshape(-1, 1, 2)
        dst = xb[[m.trainIdx for m in good]].reshape(-1, 1, 2)
        cv2 = self.cv2
        if self.g.model == "homography":
            _, mask = cv2.findHomography(src, dst, cv2.RANSAC, self.g.reproj, maxIters=self.g.iters)
        else:
            _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, maxIters=self.g.iters,
                                                  ransacReprojThreshold=self.g.reproj)
        return int(mask.sum()) if mask is not None else 0

    def inliers(self, query_uri: str, gallery_uri: str, region: str | None = None) -> int:
        """The pair's inlier count: the largest of the query's, the mirrored query's (``flip``) and,
        with ``regions`` and a ``region`` label, the cropped region's (and its mirror's), in that
        order; with ``early`` the first count reaching ``cap`` ends the row (the boost is full)."""
        gal = self.features(gallery_uri)
        n = 0
        for r in ((None, region) if self.g.regions and _box(region) else (None,)):
            for mirror in ((False, True) if self.g.flip else (False,)):
                n = max(n, self.count(self.features(query_uri, mirror, r), gal))
                if self.g.early and n >= self.g.cap:
                    return n
        return n


def _box(region: str | None) -> tuple[float, float, float, float] | None:
    from retrieval.extract.regions import parse_label

    got = parse_label(region)
    return got[1] if got is not None else None


_MATCHERS: dict[Geometric, Matcher] = {}


def process_matcher(g: Geometric) -> Matcher:
    """This process's matcher for ``g`` (its feature cache lives as long as the process)."""
    m = _MATCHERS.get(g)
    if m is None:
        _MATCHERS.clear()
        m = _MATCHERS[g] = Matcher(g)
    return m


def _error(exc: BaseException, which: str, uri: str) -> str:
    return f"cannot read {which} image {uri}: {exc.__class__.__name__}: {exc}"[:500]


def count_rows(matcher: Matcher, query_uri: list, gallery_uri: list, check: np.ndarray,
               regions: list | None = None) -> tuple[np.ndarray, list]:
    """Inlier counts (-1 = not checked) and errors (None = fine) of the rows where ``check``
    (``regions``: each row's ``query_region``)."""
    n = len(query_uri)
    inliers = np.full(n, -1, np.int64)
    errors: list = [None] * n
    bad: dict[tuple[str, str], str] = {}           # (role, uri) -> the error (an image is read once)
    for i in np.flatnonzero(check):
        qu, gu = ("query", query_uri[i]), ("gallery", gallery_uri[i])
        if qu in bad or gu in bad:
            errors[i] = bad.get(qu) or bad[gu]
            continue
        try:
            matcher.gray(qu[1])
        except Exception as exc:                         # an unreadable image is a recorded error
            errors[i] = bad[qu] = _error(exc, *qu)
            continue
        try:
            inliers[i] = matcher.inliers(qu[1], gu[1], regions[i] if regions is not None else None)
        except Exception as exc:
            errors[i] = bad[gu] = _error(exc, *gu)
    return inliers, errors


def verify_table(table: pa.Table, g: Geometric, matcher: Matcher | None = None) -> tuple[pa.Table, dict]:
    """The result rows (query order, then rank) with ``inliers`` / ``geometric_error`` filled for
    each query's first ``g.top`` ranks, scores boosted and ranks re-ordered; and the pass's figures."""
    t0 = time.monotonic()
    matcher = matcher or process_matcher(g)
    described = matcher.described
    if not table.num_rows:
        return table, {"geometric_rows": 0, "geometric_errors": 0, "geometric_s": 0.0, "geometric_images": 0}
    check = rows_to_check(table, g)
    inliers, errors = count_rows(matcher, table.column("query_uri").to_pylist(),
                                 table.column("gallery_uri").to_pylist(), check,
                                 table.column("query_region").to_pylist() if g.regions else None)
    table = apply(table, inliers, errors, g)
    n_err = sum(e is not None for e in errors)
    if n_err:
        log.warning("search.geometric: %d of %d rows not verified (%s)", n_err, int(check.sum()),
                    next(e for e in errors if e is not None))
    return table, {"geometric_rows": int((inliers >= 0).sum()), "geometric_errors": n_err,
                   "geometric_s": round(time.monotonic() - t0, 4),
                   "geometric_images": matcher.described - described}


def rows_to_check(table: pa.Table, g: Geometric) -> np.ndarray:
    """The rows verified: a query's first ``top`` ranks whose ``norm_score`` (``score`` when the search
    does not normalise) reaches ``gate``."""
    col = table.column("norm_score")
    col = col if col.null_count == 0 else table.column("score")
    key = col.to_numpy(zero_copy_only=False).astype(np.float64)
    return (table.column("rank").to_numpy() <= g.top) & (key >= g.gate)


def apply(table: pa.Table, inliers: np.ndarray, errors: list, g: Geometric) -> pa.Table:
    """Fill the columns, boost the scores, re-order each query's rows by the boosted score."""
    boost = np.where(inliers >= 0, g.boosts(inliers), 0.0)
    score = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64) + boost
    norm_col = table.column("norm_score")
    norm = norm_col.to_numpy(zero_copy_only=False).astype(np.float64) + boost if norm_col.null_count == 0 else None
    key = norm if norm is not None else score
    qids = table.column("query_id").to_pylist()
    starts = np.flatnonzero([i == 0 or qids[i] != qids[i - 1] for i in range(len(qids))])
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(qids)]))
    order = np.lexsort((table.column("rank").to_numpy(), -key, group))
    rank = np.arange(len(qids)) - starts[group] + 1
    cols = {name: table.column(name) for name in table.column_names}
    cols["score"] = pa.array(score.astype(np.float32))
    if norm is not None:
        cols["norm_score"] = pa.array(norm.astype(np.float32))
    cols["inliers"] = pa.array(np.where(inliers >= 0, inliers, 0).astype(np.int32), mask=inliers < 0)
    cols["geometric_error"] = pa.array(errors, pa.string())
    out = pa.table(cols, schema=table.schema).take(pa.array(order))
    return out.set_column(out.schema.get_field_index("rank"), "rank", pa.array(rank.astype(np.int32)))
