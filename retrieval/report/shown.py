"""The images the page shows: thumbnails (``report.thumbnails``: embed / files / none), the
full-size copies they link to (``report.full_size``), and the refusals.

Only images under the input roots the run's manifests record are read
(:mod:`retrieval.report.roots`); a shown query or match whose URI lies elsewhere gets a
placeholder, is counted (``counts.thumbnails_outside_roots``), logged and named in a warning on
the page.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from retrieval.config import Config
from retrieval.report.roots import InputRoots

log = logging.getLogger(__name__)
OUTSIDE = "not read: outside the input roots the manifests record"
FRAME = 256     # the page shows each thumbnail in a FRAME x FRAME px box (report.html.j2's CSS)


@dataclass
class ShownImages:
    mode: str
    roots: InputRoots
    thumbs: dict = field(default_factory=dict)          # uri -> Thumb (those read)
    rel: dict[str, str] = field(default_factory=dict)   # uri -> thumbs/<hash>.jpg (files mode)
    outside: dict[str, None] = field(default_factory=dict)   # shown URIs refused (outside the roots), in order

    def src(self, uri: str) -> str | None:
        """A thumbnail's ``src`` (None: no thumbnail, :meth:`reason` says why)."""
        t = self.thumbs.get(uri)
        if t is None or t.jpeg is None:
            return None
        return self.rel.get(uri) if self.mode == "files" else t.data_uri()

    def full(self, uri: str) -> str | None:
        """The relative link to the full-size copy (None: none written)."""
        t = self.thumbs.get(uri)
        return t.full if t is not None and t.jpeg is not None else None

    def region_boxes(self, fq: Any, frame: int = FRAME) -> list[dict]:
        """The query regions of a flagged query's shown matches as boxes over its thumbnail, in
        px of the ``frame`` x ``frame`` box the page shows it in (``object-fit: contain``): one per
        region, ``tag`` naming the matches' ranks (``#1 #3``); none without a thumbnail."""
        from retrieval.extract.regions import parse_label

        t = self.thumbs.get(fq.query_uri)
        if t is None or t.jpeg is None or not t.width or not t.height:
            return []
        scale = frame / max(t.width, t.height)
        w, h = t.width * scale, t.height * scale
        ox, oy = (frame - w) / 2, (frame - h) / 2
        ranks: dict[str, list[int]] = {}
        for m in fq.matches:
            if m.query_region and parse_label(m.query_region) is not None:
                ranks.setdefault(m.query_region, []).append(m.rank)
        out = []
        for label, rs in ranks.items():
            name, (x0, y0, x1, y1) = parse_label(label)
            out.append({"left": round(ox + x0 * w, 1), "top": round(oy + y0 * h, 1),
                        "width": round((x1 - x0) * w, 1), "height": round((y1 - y0) * h, 1),
                        "tag": " ".join(f"#{r}" for r in rs), "title": f"{label} (matches {', '.join(map(str, rs))})"})
        return out

    def reason(self, uri: str) -> str:
        if self.mode == "none":
            return "thumbnails off (report.thumbnails=none)"
        if uri in self.outside:
            return OUTSIDE
        t = self.thumbs.get(uri)
        return (t.error if t is not None else None) or "unavailable"

    @property
    def errors(self) -> int:
        return sum(1 for t in self.thumbs.values() if t.jpeg is None)

    def warnings(self) -> list[str]:
        if not self.outside:
            return []
        return [f"{len(self.outside):,} shown image URI(s) lie outside the input roots the manifests record "
                f"({self.roots.describe()}): not read, no thumbnail. First: {next(iter(self.outside))}"]


def shown_images(result, r: Any, cfg: Config, input_urls: list[str], progress_seconds: float,
                 output_url: str, extra_uris: list[str] | None = None) -> ShownImages:
    """Thumbnails (and full-size copies) of the shown queries and their matches (and of ``extra_uris``:
    the near-duplicate groups' members)."""
    uris = list(dict.fromkeys([*(u for fq in result.top for u in [fq.query_uri, *(m.gallery_uri for m in fq.matches)]),
                               *(extra_uris or [])]))
    shown = ShownImages(mode=r["thumbnails"], roots=InputRoots.from_inputs(input_urls))
    if shown.mode == "none" or not uris:
        return shown
    shown.outside = dict.fromkeys(u for u in uris if u and not shown.roots.allows(u))
    if shown.outside:
        log.warning("report: %d shown image URI(s) outside the input roots the manifests record (%s) are not "
                    "read, e.g. %s", len(shown.outside), shown.roots.describe(), list(shown.outside)[:3])
    # imported here: the image decoder pulls in torch, which a report without thumbnails skips
    from retrieval.extract.preprocess import DecodePolicy
    from retrieval.report.thumbs import make_thumbnails, write_thumbnails

    shown.thumbs = make_thumbnails([u for u in uris if u not in shown.outside], int(r["thumbnail_size"]),
                                   DecodePolicy.from_config(cfg["preprocess"].to_dict()),
                                   threads=int(r["thumbnail_threads"]), progress_seconds=progress_seconds,
                                   full_size=int(r["full_size"]), output_url=output_url)
    if shown.mode == "files":
        shown.rel = write_thumbnails(shown.thumbs, output_url)
    return shown
