"""`retrieval fit` as a Spark job: fit whitening (+ PCA heads, adapter-2 re-fit) of the model to a gallery sample -> a checkpoint for model.checkpoint.

    spark-submit --master local[*] jobs/fit.py --input URL --output MODEL_URL

Options: `retrieval fit --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
