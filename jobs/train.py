"""Three-stage training of the descriptor model (``retrieval train``).

    spark-submit --master 'local[2]' jobs/train.py --input IMAGES_URL --output CHECKPOINT_DIR_URL \
        [--set train.processes=2] [--set train.stages=[2,3]] [--conf conf/local.yaml]

``train.processes > 1`` trains data parallel through ``pyspark.ml.torch.distributor.TorchDistributor``
(``train.local_mode``: processes on the driver, else on executors; gloo on CPU).
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
