"""`retrieval run` as a Spark job: one command for your own images: fit, extract, index, normalised search, report.

    spark-submit --master local[*] jobs/run.py --gallery URL --queries URL --output URL

Options: `retrieval run --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
