"""`retrieval evaluate` as a Spark job: recall@k, micro-AP and a PR curve against ground truth.

    spark-submit --master local[*] jobs/evaluate.py --results URL --truth CSV

Options: `retrieval evaluate --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
