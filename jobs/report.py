"""`retrieval report` as a Spark job: audit report: HTML, flagged matches, summary.json.

    spark-submit --master local[*] jobs/report.py --results URL --output URL

Options: `retrieval report --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
