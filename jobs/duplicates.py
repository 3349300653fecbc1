"""`retrieval duplicates` as a Spark job: near-duplicate groups: the gallery searched against itself, pairs above a threshold, connected components.

    spark-submit --master local[*] jobs/duplicates.py --index URL --output URL

Options: `retrieval duplicates --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
