"""Near-duplicate groups of a gallery (``retrieval duplicates``; docs/lifecycle.md).

- :mod:`retrieval.duplicates.groups`: the output's files and reader (``groups.parquet``,
  ``edges.parquet``), the pairs kept, the groups made from the connected components
- :mod:`retrieval.duplicates.job`: the stage function (the gallery searched against itself, the
  threshold, the components on the engine, the manifest)
- :mod:`retrieval.duplicates.stage`: its ``STAGE``
"""
