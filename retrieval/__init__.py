"""Distributed batch pipeline for billion-scale image gallery indexing and copy detection."""
import os as _os

# OpenMP threads wait passively (sleep) between parallel regions instead of spinning. Set here, at
# the package's first import, because every OpenMP runtime reads it once, when it is loaded: torch's
# libgomp (loaded by ``import torch``; numba's "omp" threading layer, which runs the search kernels,
# binds to that same libgomp.so.1 when torch came first) and faiss's own copy (``import faiss``).
# Set only in retrieval.index, it came too late whenever torch or faiss was imported before it (as in
# tests/bench/bench_search.py): numba's workers then spun after every kernel call (8% of the warm
# search's CPU samples in libgomp's spin loop) and, on a machine whose 2 cores are shared, took the
# CPU from the next stage (OMP_WAIT_POLICY=ACTIVE, spinning without bound, made the warm 1M search
# 1.6x slower on this 2-core machine: 6.0 s vs 3.65 s median of 6 calls each, under load 4-6).
# A value the user set is kept. Import ``retrieval`` before torch / faiss for it to take effect.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"

# the stage registry: installs the stages' config rules in retrieval.config (the stage modules
# themselves are imported only when a configuration is loaded or the CLI is built)
from retrieval import registry as _registry  # noqa: E402,F401
