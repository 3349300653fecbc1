"""Deprecated until 0.3: the default model's recipe moved to :mod:`retrieval.recipes.default_model`
(``python -m retrieval.recipes.default_model``). ``python -m retrieval.train.default_model`` still
runs it, with a deprecation message; the training stage itself imports no recipe."""
from __future__ import annotations

if __name__ == "__main__":  # pragma: no cover
    import runpy
    import sys

    print("retrieval: python -m retrieval.train.default_model is deprecated and will be removed in 0.3: "
          "use python -m retrieval.recipes.default_model", file=sys.stderr)
    runpy.run_module("retrieval.recipes.default_model", run_name="__main__", alter_sys=True)
