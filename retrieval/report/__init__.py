"""Audit reports over search results (``retrieval report`` / ``jobs/report.py``).

- :mod:`retrieval.report.runinfo`: the search manifest and the manifests of the stages behind it
  (query extraction, index, gallery extraction), read defensively;
- :mod:`retrieval.report.scan`: ONE streaming pass over the result Parquet (pyarrow record
  batches, bounded memory): score histogram, threshold bands, flagged matches written to
  ``flagged.parquet`` / ``flagged.csv``, the top-N flagged queries, ground-truth figures;
- :mod:`retrieval.report.thumbs`: small JPEG thumbnails of the shown images;
- :mod:`retrieval.report.html`: the self-contained, escaped HTML page (jinja2 templates in ``templates/``);
- :mod:`retrieval.report.job`: :func:`build_report`, which wires them and writes the marker
  ``_manifest.json`` last (:mod:`retrieval.outputs`).
"""
from retrieval.report.job import build_report

__all__ = ["build_report"]
