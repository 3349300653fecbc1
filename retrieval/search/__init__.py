"""Two-stage search (``retrieval search``): per-shard coarse IVF search over 128-d codes, merge to
a global shortlist, exact 512-d rerank (docs/search.md).

- :mod:`retrieval.search.coarse`: shard cache, shard search, shortlist merge
- :mod:`retrieval.search.rerank`: fetch shortlist vectors by feature file / row group, exact scores
- :mod:`retrieval.search.queries`: query input (encode or reuse), model_version check, chunks
- :mod:`retrieval.search.job`: the job (local and Spark engines), output and manifest
"""
from __future__ import annotations

from retrieval.search.job import RESULT_SCHEMA, read_results, search

__all__ = ["search", "read_results", "RESULT_SCHEMA"]
