"""Daily copy-detection pipeline (Airflow 3): the day's new gallery images are encoded and added to
the index, the day's queries are encoded and searched, and an audit report is written.

    check_new_gallery --> extract_gallery --> choose_index_mode --> build_index | append_index --+
          |                                                                                      |
          +--> no_new_gallery ---------------------------------------------------------------+   |
    extract_queries --------------------------------------------------------------------------+--+--> search
    search --> audit_report --> publish_summary

One ``SparkSubmitOperator`` per stage, each running the stage's job file (``jobs/*.py``). Nothing
about the cluster or the storage is written here:

- the Airflow connection ``retrieval_spark`` (type Spark) holds the master (``yarn``,
  ``k8s://https://host:443``, ``spark://host:7077``, ``local[4]``) and its extras
  (``deploy-mode``, ``queue``, ``namespace``, ``spark-binary``);
- the Airflow Variable ``retrieval_pipeline`` (JSON) holds the storage layout and the job settings::

    {"gallery_input": "s3://bucket/gallery-drops",  # new gallery images of day DS: <gallery_input>/DS/
     "query_input": "s3://bucket/query-drops",      # queries of day DS:            <query_input>/DS/
     "work_root": "s3://bucket/retrieval",          # features and results, per day
     "index": "s3://bucket/retrieval/index",        # the index, extended every day
     "report_root": "s3://bucket/reports",          # <report_root>/DS/report.html, summary.json, ...
     "jobs_dir": "/opt/retrieval/jobs",             # where jobs/*.py are, as spark-submit sees them
     "retrieval_conf": "/opt/retrieval/conf/cluster.yaml",   # --conf overlay of every job
     "spark_properties": "/opt/retrieval/spark-retrieval.conf",  # spark-submit --properties-file
     "truth": "",                                   # optional ground truth CSV for the report
     "storage_conn_id": "aws_default",              # optional: credentials for the existence checks
     "max_flagged_queries": null}                   # optional: fail publish_summary above this

  The properties file carries the Spark settings of the cluster (executor sizes, GPU resources,
  ``spark.archives=env.tar.gz#env``, ``spark.pyspark.python=./env/bin/python``; docs/cluster.md).

Runs are serialised (``max_active_runs=1``): each day appends to the same index. Retries: the
Airflow config section ``[retrieval]`` (``retries``, default 2; ``retry_delay_minutes``, default 10).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, ObjectStoragePath, TriggerRule, Variable, task
from airflow.sdk.configuration import conf as airflow_conf

DAG_ID = "retrieval_daily"
SPARK_CONN_ID = "retrieval_spark"
SETTINGS_VARIABLE = "retrieval_pipeline"
log = logging.getLogger(__name__)


def s(key: str) -> str:
    """Template of a required setting (rendering fails, naming the key, when it is missing)."""
    return "{{ var.json.%s['%s'] }}" % (SETTINGS_VARIABLE, key)


def day(key: str, *parts: str) -> str:
    """Template of the run date's directory under a setting: ``<setting>/<part>/.../<ds>``."""
    return "/".join([s(key), *parts, "{{ ds }}"])


GALLERY_FEATURES = day("work_root", "gallery_features")
QUERY_FEATURES = day("work_root", "query_features")
RESULTS = day("work_root", "results")
REPORT = day("report_root")
COMMON_ARGS = ["--conf", s("retrieval_conf")]


def settings() -> dict[str, Any]:
    value = Variable.get(SETTINGS_VARIABLE, deserialize_json=True)
    if not isinstance(value, dict):
        raise ValueError(f"Airflow Variable {SETTINGS_VARIABLE} must be a JSON object")
    return value


def storage_path(url: str, conf: dict[str, Any]) -> ObjectStoragePath:
    if "://" not in url:
        url = "file://" + url
    conn_id = conf.get("storage_conn_id") or None
    return ObjectStoragePath(url, conn_id=conn_id) if conn_id else ObjectStoragePath(url)


def spark_job(task_id: str, job: str, args: list[str], **kwargs: Any) -> SparkSubmitOperator:
    return SparkSubmitOperator(
        task_id=task_id,
        conn_id=SPARK_CONN_ID,
        application=f"{s('jobs_dir')}/{job}",
        properties_file=s("spark_properties"),
        name=f"retrieval-{task_id}-{{{{ ds }}}}",
        application_args=[*args, *COMMON_ARGS],
        **kwargs,
    )


with DAG(
    dag_id=DAG_ID,
    description="extract new gallery images -> extend the index -> extract + search the day's queries -> audit report",
    schedule="@daily",
    start_date=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    # Airflow config section [retrieval] (or AIRFLOW__RETRIEVAL__RETRIES=...): retries of every task
    default_args={"retries": airflow_conf.getint("retrieval", "retries", fallback=2),
                  "retry_delay": dt.timedelta(minutes=airflow_conf.getint("retrieval", "retry_delay_minutes",
                                                                          fallback=10))},
    tags=["retrieval", "spark"],
    doc_md=__doc__,
) as dag:

    @task.branch(task_id="check_new_gallery")
    def check_new_gallery(ds: str | None = None) -> str:
        """Extract only when the day's gallery drop exists and holds files."""
        conf = settings()
        path = storage_path(f"{conf['gallery_input']}/{ds}", conf)
        if path.exists() and any(True for _ in path.iterdir()):
            return "extract_gallery"
        log.info("no new gallery images under %s: the index is searched as it is", path)
        return "no_new_gallery"

    @task.branch(task_id="choose_index_mode")
    def choose_index_mode() -> str:
        """Append to the index when it exists (same trained quantizer), else build it."""
        conf = settings()
        manifest = storage_path(f"{conf['index']}/manifest.json", conf)
        return "append_index" if manifest.exists() else "build_index"

    @task(task_id="publish_summary", multiple_outputs=False)
    def publish_summary(ds: str | None = None) -> dict[str, Any]:
        """The report's summary.json as this task's XCom (for alerting and downstream DAGs)."""
        conf = settings()
        path = storage_path(f"{conf['report_root']}/{ds}/summary.json", conf)
        summary = json.loads(path.read_text())
        counts = summary.get("counts", {})
        log.info("report %s: %s flagged queries, %s flagged matches, %s rows; errors %s",
                 ds, counts.get("flagged_queries"), counts.get("flagged_matches"), counts.get("rows"),
                 summary.get("errors"))
        limit = conf.get("max_flagged_queries")
        if limit is not None and (counts.get("flagged_queries") or 0) > int(limit):
            raise RuntimeError(f"{counts.get('flagged_queries')} flagged queries on {ds} > "
                               f"max_flagged_queries {limit}: see {conf['report_root']}/{ds}/report.html")
        return summary

    extract_gallery = spark_job(
        "extract_gallery", "extract_features.py",
        ["--input", day("gallery_input"), "--output", GALLERY_FEATURES, "--role", "gallery"])
    build_index = spark_job(
        "build_index", "build_index.py", ["--features", GALLERY_FEATURES, "--output", s("index")])
    append_index = spark_job(
        "append_index", "build_index.py", ["--features", GALLERY_FEATURES, "--output", s("index"), "--append"])
    no_new_gallery = EmptyOperator(task_id="no_new_gallery")
    extract_queries = spark_job(
        "extract_queries", "extract_features.py",
        ["--input", day("query_input"), "--output", QUERY_FEATURES, "--role", "query"])
    search = spark_job(
        "search", "search.py", ["--queries", QUERY_FEATURES, "--index", s("index"), "--output", RESULTS],
        trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    audit_report = spark_job(
        "audit_report", "audit_report.py",
        ["--results", RESULTS, "--output", REPORT,
         "--truth", "{{ var.json.%s.get('truth') or '' }}" % SETTINGS_VARIABLE])

    gallery_branch = check_new_gallery()
    index_branch = choose_index_mode()
    gallery_branch >> [extract_gallery, no_new_gallery]
    extract_gallery >> index_branch >> [build_index, append_index]
    [build_index, append_index, no_new_gallery, extract_queries] >> search
    search >> audit_report >> publish_summary()
