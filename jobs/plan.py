"""Capacity plan for N images from the measured rates (``retrieval plan``); runs on the driver, no Spark.

    python jobs/plan.py --images 1e9 [--executors 100] [--gpus 0]
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
