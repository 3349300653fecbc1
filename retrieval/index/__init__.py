"""The index stage: sharded faiss IVF-PQ over the 128-d coarse codes (docs/index.md).

``build.build_index`` builds or extends an index; ``store`` reads one (manifest, shards);
``idmap`` defines the int64 ids.
"""
import os

# faiss runs OpenMP loops; with busy-waiting threads (libgomp's default) a CPU shared with other
# work (Spark tasks, other jobs) makes k-means 10x slower. Passive waiting costs nothing
# measurable here. Read once, when faiss is first imported in the process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
