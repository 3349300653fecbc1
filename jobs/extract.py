"""`retrieval extract` as a Spark job: images -> Parquet feature shards (coarse 128-d + fine 512-d).

    spark-submit --master local[*] jobs/extract.py --input URL --output URL --role gallery|query

Options: `retrieval extract --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
