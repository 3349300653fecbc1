"""`retrieval index` as a Spark job: gallery feature shards -> sharded faiss IVF-PQ index (old name: build-index).

    spark-submit --master local[*] jobs/build_index.py --features URL --output URL

Deprecated name (removed in 0.3): use jobs/index.py.

Options: `retrieval index --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
