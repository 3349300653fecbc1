"""Job: evaluate search results against ground truth (recall@k, micro-AP, PR curve; optionally
exact 512-d search for comparison). Same as `retrieval evaluate`; runs on the driver.

    spark-submit --master local[*] jobs/evaluate.py \
        --results /data/search/2026-11-21 --truth /data/truth.csv \
        [--output /data/search/2026-11-21.eval] [--exact /data/index/gallery]
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
