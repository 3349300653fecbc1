"""Spark job: images -> Parquet feature shards (coarse 128-d + fine 512-d). Same as `retrieval extract`.

    spark-submit --master local[*] jobs/extract_features.py \
        --input /data/gallery --output /data/features/gallery --role gallery \
        [--conf conf/cluster.yaml] [--set extract.num_shards=64]

On a cluster (see README "Running on a cluster"):
    spark-submit --master yarn --archives env.tar.gz#env \
        --conf spark.pyspark.python=./env/bin/python \
        jobs/extract_features.py --input s3://bucket/uploads/2026-11-21 \
        --output s3://bucket/features/gallery/2026-11-21 --role gallery --conf conf/cluster.yaml
"""
import sys

from retrieval.cli import entry

if __name__ == "__main__":
    entry(["extract", *sys.argv[1:]])
