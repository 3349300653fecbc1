"""The configured model's trunk as an ONNX file for ``model.runtime: onnx`` (``retrieval export``); runs on
the driver, no Spark.

    python jobs/export.py --format onnx --output /data/models/trunk.onnx
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
