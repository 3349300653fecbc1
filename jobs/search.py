"""Spark job: two-stage search (coarse IVF per index shard, merge, exact 512-d rerank). Same as
`retrieval search`.

    spark-submit --master local[*] jobs/search.py \
        --queries /data/uploads/2026-11-21 --index /data/index/gallery \
        --output /data/search/2026-11-21 [--conf conf/cluster.yaml] [--set search.shortlist=500]

``--queries`` is any extraction input (directory, manifest, Parquet with bytes: encoded here with
the query role into <output>.query_features, beside the results) or an existing query feature output.

On a cluster (see README "Running on a cluster"):
    spark-submit --master yarn --archives env.tar.gz#env \
        --conf spark.pyspark.python=./env/bin/python \
        jobs/search.py --queries s3://bucket/uploads/2026-11-21 --index s3://bucket/index/gallery \
        --output s3://bucket/search/2026-11-21 --conf conf/cluster.yaml
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
