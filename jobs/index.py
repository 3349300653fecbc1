"""Spark job: gallery feature shards -> sharded faiss IVF-PQ index. Same as `retrieval index`.

    spark-submit --master local[*] jobs/index.py \
        --features /data/features/gallery --output /data/index/gallery \
        [--conf conf/cluster.yaml] [--set index.vectors_per_shard=10000000]

Add new gallery features to an existing index (same trained quantizer, new shards):
    spark-submit --master local[*] jobs/index.py \
        --features /data/features/gallery-2026-11-22 --output /data/index/gallery --append

On a cluster (see README "Running on a cluster"):
    spark-submit --master yarn --archives env.tar.gz#env \
        --conf spark.pyspark.python=./env/bin/python \
        jobs/index.py --features s3://bucket/features/gallery/2026-11-21 \
        --output s3://bucket/index/gallery --conf conf/cluster.yaml
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
