"""`retrieval export` as a Spark job: the model's trunk (backbone + GeM) as an ONNX file for model.runtime=onnx.

    spark-submit --master local[*] jobs/export.py --format onnx --output FILE

Options: `retrieval export --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
