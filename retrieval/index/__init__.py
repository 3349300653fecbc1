"""The index stage: sharded faiss IVF-PQ over the 128-d coarse codes (docs/index.md).

``build.build_index`` builds or extends an index; ``store`` reads one (manifest, shards);
``idmap`` defines the int64 ids.
"""
# OMP_WAIT_POLICY=PASSIVE (faiss's k-means is 10x slower with busy-waiting OpenMP threads on a
# shared CPU) is set by the ``retrieval`` package itself, which Python imports before this one.
