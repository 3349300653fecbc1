"""Spark job: fit the model's label-free post-processing (whitening, PCA heads for untrained
adapters, adapter-2 re-fit) to a gallery sample. Same as `retrieval fit`.

    spark-submit --master local[*] jobs/fit.py \
        --input /data/gallery/images --output /data/models/gallery-fit.pt [--set fit.sample=100000]

then every later stage: --set model.checkpoint=/data/models/gallery-fit.pt (plus the same
model.backbone / model.backbone_weights keys the model was fitted with).
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
