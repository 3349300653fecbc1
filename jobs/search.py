"""`retrieval search` as a Spark job: two-stage search: coarse IVF-PQ per shard, merge, exact 512-d rerank.

    spark-submit --master local[*] jobs/search.py --queries URL --index URL --output URL

Options: `retrieval search --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
