"""`retrieval pdq` as a Spark job: PDQ hash lists: export the gallery's hashes as CSV, match a partner's list against the index.

    spark-submit --master local[*] jobs/pdq.py export --features URL --output FILE | match --hash-list URL --index URL --output URL

Options: `retrieval pdq --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
