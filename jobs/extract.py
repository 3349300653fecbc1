"""Spark job: images -> Parquet feature shards (coarse 128-d + fine 512-d). Same as `retrieval extract`.

    spark-submit --master local[*] jobs/extract.py \
        --input /data/gallery --output /data/features/gallery --role gallery \
        [--conf conf/cluster.yaml] [--set extract.num_shards=64]

On a cluster (see README "Running on a cluster"):
    spark-submit --master yarn --archives env.tar.gz#env \
        --conf spark.pyspark.python=./env/bin/python \
        jobs/extract.py --input s3://bucket/uploads/2026-11-21 \
        --output s3://bucket/features/gallery/2026-11-21 --role gallery --conf conf/cluster.yaml
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
