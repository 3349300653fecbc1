"""`retrieval plan` as a Spark job: capacity plan for N images from measured rates.

    spark-submit --master local[*] jobs/plan.py --images 1e9

Options: `retrieval plan --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
