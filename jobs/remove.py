"""`retrieval remove` as a Spark job: take gallery images down from an index: never returned by a search from the moment it commits.

    spark-submit --master local[*] jobs/remove.py --index URL --ids URL

Options: `retrieval remove --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
