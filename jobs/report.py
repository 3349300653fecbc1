"""Audit report over one search output (``retrieval report``).

    spark-submit --master 'local[2]' jobs/report.py --results RESULTS_URL --output REPORT_URL \
        [--truth TRUTH_CSV] [--set report.threshold=0.8] [--conf conf/local.yaml]

On a cluster (see docs/cluster.md), with the packed environment:

    spark-submit --master yarn --deploy-mode cluster --archives env.tar.gz#env \
        --conf spark.pyspark.python=./env/bin/python jobs/report.py \
        --results s3://bucket/work/2024-01-01/results --output s3://bucket/reports/2024-01-01

Writes ``report.html`` (self-contained), ``flagged.parquet``, ``flagged.csv`` and, last,
``summary.json``. The results are streamed with pyarrow on the driver (bounded memory).
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
