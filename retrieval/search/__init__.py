"""Two-stage search (``retrieval search``): per-shard coarse IVF search over 128-d codes, merge to
a global shortlist, exact 512-d rerank (docs/search.md).

- :mod:`retrieval.search.coarse`: shard cache, shard search, shortlist merge
- :mod:`retrieval.search.rerank`: fetch shortlist vectors by feature file / row group, exact scores
- :mod:`retrieval.search.queries`: query input (encode or reuse), model_version check, chunks
- :mod:`retrieval.search.vectors`: gallery fine vectors and labels read by row group, kept per process
- :mod:`retrieval.search.blocks`: the gallery-major rerank (blocks, routing, per-block scoring)
- :mod:`retrieval.search.tasks`: the task bodies, the same in both engines
- :mod:`retrieval.search.flow`: the plan (keyed stages over the tasks) that an engine runs
- :mod:`retrieval.search.job`: the job's plan, run and manifest
- :mod:`retrieval.search.results`: the reader of a search output
"""
from __future__ import annotations

from retrieval.search.job import RESULT_SCHEMA, search
from retrieval.search.results import read_results

__all__ = ["search", "read_results", "RESULT_SCHEMA"]
