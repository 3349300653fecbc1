"""`retrieval train` as a Spark job: three-stage training of the descriptor model.

    spark-submit --master local[*] jobs/train.py --input URL --output URL

Options: `retrieval train --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
