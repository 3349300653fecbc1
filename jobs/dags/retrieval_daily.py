"""Daily copy-detection pipeline (Airflow 3): the model is fitted to the gallery once (when asked
for), the day's new gallery images are encoded and added to the index, the day's queries are encoded
and searched (scores normalised against a background set, when one is configured), and an audit
report is written.

    check_model --> fit | model_ready --> check_new_gallery, extract_queries, check_background
    check_new_gallery --> extract_gallery --> choose_index_mode --> index | index_append --------+
          |                                                                                      |
          +--> no_new_gallery ---------------------------------------------------------------+   |
    extract_queries --------------------------------------------------------------------------+--+--> search
    check_background --> extract_background | background_ready -------------------------------+
    search --> report --> publish_summary

The model exists before anything is encoded: ``check_model`` runs ``fit`` when the Variable names a
``model`` checkpoint that does not exist yet (else ``model_ready``), and every stage that encodes or
searches (``extract_gallery``, ``extract_queries``, ``extract_background``, ``search``) runs with
``--set model.checkpoint=<model>``. ``check_background`` extracts the background images once, with
that model, to ``<work_root>/background_features`` (when its ``_manifest.json`` is missing), and
``search`` normalises its scores against them (``search.normalize.background``).

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
     "max_flagged_queries": null,                   # optional: fail publish_summary above this
     "model": "s3://bucket/models/gallery-fit.pt",  # optional: the model checkpoint (model.checkpoint of every
                                                    #   encoding stage); `retrieval fit` writes it when it does
                                                    #   not exist yet; unset: the model of retrieval_conf (the
                                                    #   shipped default model), no fit
     "fit_input": "s3://bucket/gallery-drops/2024-01-01",  # optional: images the fit uses (default: the run
                                                    #   day's gallery drop <gallery_input>/DS)
     "background_input": "s3://bucket/unrelated",   # optional: unrelated images for score normalisation,
                                                    #   extracted once (with the model) to
                                                    #   <work_root>/background_features
     "background": "gallery",                       # optional, without background_input: the value of
                                                    #   search.normalize.background (a feature output URL of
                                                    #   the same model, or "gallery" for galleries >= 100 x
                                                    #   search.normalize.sample); neither: no normalisation
                                                    #   (unless retrieval_conf sets it)
     "report_threshold": 0.2}                       # optional: report.threshold; normalised scores are lower
                                                    #   than raw cosines (the 0.75 default may flag nothing):
                                                    #   take it from `retrieval evaluate` on labelled pairs

  Unset optional keys leave the job settings of ``retrieval_conf`` as they are.

  The properties file carries the Spark settings of the cluster (executor sizes, GPU resources,
  ``spark.archives=env.tar.gz#env``, ``spark.pyspark.python=./env/bin/python``; docs/cluster.md).

Runs are serialised (``max_active_runs=1``): each day appends to the same index. The index, the
gallery features and the background features all belong to one model: a different ``model`` needs a
new ``index`` and ``work_root``. Retries: the Airflow config section ``[retrieval]`` (``retries``,
default 2; ``retry_delay_minutes``, default 10). A retry resumes its stage's output; while an earlier
attempt still writes it (its lease is renewed), the retry is refused, and a killed attempt's lease
expires after ``io.lease_seconds`` (3 minutes: keep it well under the retry delay).
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


def optional(key: str) -> str:
    """Jinja expression of an optional setting (None when missing)."""
    return "var.json.%s.get('%s')" % (SETTINGS_VARIABLE, key)


def set_when(config_key: str, test: str, value: str) -> str:
    """Template of ONE job argument: ``--set=<config_key>=<value>`` when the Jinja expression ``test``
    is true, else ``--conf=<retrieval_conf>`` again (a no-op: the same overlay applied twice), so that
    an unset optional key leaves the job's configuration as ``retrieval_conf`` has it."""
    return "{%% if %s %%}--set=%s=%s{%% else %%}--conf=%s{%% endif %%}" % (
        test, config_key, value, s("retrieval_conf"))


GALLERY_FEATURES = day("work_root", "gallery_features")
QUERY_FEATURES = day("work_root", "query_features")
BACKGROUND_FEATURES = "/".join([s("work_root"), "background_features"])   # not per day: extracted once
RESULTS = day("work_root", "results")
REPORT = day("report_root")
COMMON_ARGS = ["--conf", s("retrieval_conf")]
# the fitted model, for every stage that encodes images or compares their codes (not fit itself)
MODEL_ARGS = [set_when("model.checkpoint", optional("model"), "{{ %s }}" % optional("model"))]
# the images fit uses: fit_input, else the run day's gallery drop
FIT_INPUT = "{%% if %s %%}{{ %s }}{%% else %%}%s{%% endif %%}" % (
    optional("fit_input"), optional("fit_input"), day("gallery_input"))
# score normalisation: the extracted background_input, else `background` (a URL or "gallery")
NORMALIZE_ARGS = [set_when(
    "search.normalize.background", "%s or %s" % (optional("background_input"), optional("background")),
    "{%% if %s %%}%s{%% else %%}{{ %s }}{%% endif %%}" % (optional("background_input"), BACKGROUND_FEATURES,
                                                          optional("background")))]
REPORT_ARGS = [set_when("report.threshold", "%s is not none" % optional("report_threshold"),
                        "{{ %s }}" % optional("report_threshold"))]
AFTER_BRANCH = TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS   # one of a branch's two alternatives is skipped


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

    @task.branch(task_id="check_model")
    def check_model() -> str:
        """Fit the model when the Variable names a checkpoint that does not exist yet."""
        conf = settings()
        if not conf.get("model"):
            log.info("no model in %s: the model of retrieval_conf is used", SETTINGS_VARIABLE)
            return "model_ready"
        path = storage_path(conf["model"], conf)
        if path.exists():
            log.info("model %s exists", path)
            return "model_ready"
        log.info("model %s does not exist yet: fit", path)
        return "fit"

    @task.branch(task_id="check_background", trigger_rule=AFTER_BRANCH)
    def check_background() -> str:
        """Extract the background images (once) when background_input is set and not extracted yet."""
        conf = settings()
        if not conf.get("background_input"):
            return "background_ready"
        manifest = storage_path(f"{conf['work_root']}/background_features/_manifest.json", conf)
        if manifest.exists():
            log.info("background features %s exist", manifest)
            return "background_ready"
        return "extract_background"

    @task.branch(task_id="check_new_gallery", trigger_rule=AFTER_BRANCH)
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
        # the index's marker; indexes built before 0.2 named it manifest.json
        markers = [storage_path(f"{conf['index']}/{name}", conf) for name in ("_manifest.json", "manifest.json")]
        return "index_append" if any(m.exists() for m in markers) else "index"

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

    fit = spark_job("fit", "fit.py", ["--input", FIT_INPUT, "--output", s("model")])
    model_ready = EmptyOperator(task_id="model_ready")
    extract_background = spark_job(
        "extract_background", "extract.py",
        ["--input", s("background_input"), "--output", BACKGROUND_FEATURES, "--role", "gallery", *MODEL_ARGS])
    background_ready = EmptyOperator(task_id="background_ready")
    extract_gallery = spark_job(
        "extract_gallery", "extract.py",
        ["--input", day("gallery_input"), "--output", GALLERY_FEATURES, "--role", "gallery", *MODEL_ARGS])
    index_build = spark_job(
        "index", "index.py", ["--features", GALLERY_FEATURES, "--output", s("index")])
    index_append = spark_job(
        "index_append", "index.py", ["--features", GALLERY_FEATURES, "--output", s("index"), "--append"])
    no_new_gallery = EmptyOperator(task_id="no_new_gallery")
    extract_queries = spark_job(
        "extract_queries", "extract.py",
        ["--input", day("query_input"), "--output", QUERY_FEATURES, "--role", "query", *MODEL_ARGS],
        trigger_rule=AFTER_BRANCH)
    search = spark_job(
        "search", "search.py",
        ["--queries", QUERY_FEATURES, "--index", s("index"), "--output", RESULTS, *MODEL_ARGS, *NORMALIZE_ARGS],
        trigger_rule=AFTER_BRANCH)
    report_task = spark_job(
        "report", "report.py",
        ["--results", RESULTS, "--output", REPORT,
         "--truth", "{{ var.json.%s.get('truth') or '' }}" % SETTINGS_VARIABLE, *REPORT_ARGS])

    model_branch = check_model()
    gallery_branch = check_new_gallery()
    index_branch = choose_index_mode()
    background_branch = check_background()
    model_branch >> [fit, model_ready]
    [fit, model_ready] >> gallery_branch              # the model exists before anything is encoded
    [fit, model_ready] >> extract_queries
    [fit, model_ready] >> background_branch
    gallery_branch >> [extract_gallery, no_new_gallery]
    extract_gallery >> index_branch >> [index_build, index_append]
    background_branch >> [extract_background, background_ready]
    [index_build, index_append, no_new_gallery, extract_queries, extract_background, background_ready] >> search
    search >> report_task >> publish_summary()
