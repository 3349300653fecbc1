"""Daily copy-detection pipeline (Airflow 3): the model is fitted to the gallery once (when asked
for), the gallery images that arrived since the last indexed drop are encoded and added to the index,
the day's queries are encoded and searched (scores normalised against a background set, when one is
configured), and an audit report is written.

    check_model --> fit | model_ready --> wait_for_gallery, wait_for_queries, check_background
    wait_for_gallery --> new_gallery_drops --> check_new_gallery --> extract_gallery[drop, ...] --> choose_index_mode
          choose_index_mode --> index | index_append -------------------------------------------------+
          check_new_gallery --> no_new_gallery ----------------------------------------------------+   |
    wait_for_queries --> extract_queries ----------------------------------------------------------+---+--> search
    check_background --> extract_background | background_ready ------------------------------------+
    search --> report --> publish_summary

The run of day DS starts when DS is over (00:00 UTC of DS + 1: a data-interval schedule; Airflow 3's
``@daily`` would start it at 00:00 of DS, before the day's drops exist). Drops arrive late, and the
scheduler misses days; the DAG waits and catches up:

- ``wait_for_queries`` waits for the day's query drop ``<query_input>/DS`` (a sensor in reschedule
  mode: it holds no worker slot between pokes) up to ``[retrieval] query_wait_minutes`` (default 360);
  a drop that is still missing then FAILS the sensor (no retry), so the run ends failed and alerts;
  ``extract_queries``, ``search``, ``report`` and ``publish_summary`` do not run, while the gallery's
  new drops are still indexed. Once the drop is there, clear ``wait_for_queries`` of that run
  (``airflow tasks clear retrieval_daily -t wait_for_queries -s DS -e DS -d``) to search it.
- ``wait_for_gallery`` waits a short while for the day's gallery drop ``<gallery_input>/DS``
  (``[retrieval] gallery_wait_minutes``, default 30) and is skipped (soft fail) when it is still
  missing; the run goes on either way.
- ``new_gallery_drops`` lists EVERY gallery drop ``<gallery_input>/YYYY-MM-DD`` up to the run's day
  that holds files and whose features (``<work_root>/gallery_features/YYYY-MM-DD``) are not among the
  index's inputs (the ``features`` of each build in the index's ``_manifest.json``): the day's drop,
  a drop that landed after its own day's run, a drop of a missed day, a drop whose extraction or
  indexing failed. ``extract_gallery`` runs once per such drop (dynamic task mapping; an extraction
  done before is resumed, not redone) and one ``index`` (the first build) or ``index_append`` adds them
  all; none: ``no_new_gallery``, the index is searched as it is. A drop folder that holds files is
  taken as complete: land a drop whole (written beside, then moved into place); files added to a
  drop after it was indexed are not indexed.
- Missed days are caught up (``catchup=True``), one run at a time in date order
  (``max_active_runs=1``: every run appends to the same index and sees the index of the days before),
  within a bounded window: ``start_date`` is today (UTC midnight) minus ``[retrieval] catchup_days``
  (default 7), so a newly deployed DAG, or a scheduler back after a long stop, processes at most the
  last ``catchup_days`` days, never a backfill from an old start date. Older days: ``airflow dags
  trigger -l DATE`` or ``airflow backfill create``. (The start date moves with the calendar, so the
  serialised DAG, and its Airflow 3 DAG version, changes once a day.) No task ``depends_on_past``: a
  failed day does not block the next one, whose ``new_gallery_drops`` indexes what the failed day
  left out.

The model exists before anything is encoded: ``check_model`` runs ``fit`` when the Variable names a
``model`` checkpoint that does not exist yet (else ``model_ready``), and every stage that encodes or
searches (``extract_gallery``, ``extract_queries``, ``extract_background``, ``search``) runs with
``--set model.checkpoint=<model>``. ``check_background`` extracts the background images once, with
that model, to ``<work_root>/background_features`` (when its ``_manifest.json`` is missing), and
``search`` normalises its scores against them (``search.normalize.background``).

One ``SparkSubmitOperator`` per stage, each running the stage's job file (``jobs/*.py``) with the
arguments of its row in ``STAGES`` (one table: task id -> job file, arguments). Nothing about the
cluster or the storage is written here:

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

The index, the gallery features and the background features all belong to one model: a different
``model`` needs a new ``index`` and ``work_root``.

The Airflow config section ``[retrieval]`` (or ``AIRFLOW__RETRIEVAL__<KEY>``) holds the DAG's
scheduling settings: ``retries`` (default 2) and ``retry_delay_minutes`` (10) of every task,
``catchup_days`` (7), ``query_wait_minutes`` (360), ``gallery_wait_minutes`` (30) and
``poke_interval_seconds`` (300) of the two sensors.
A retry resumes its stage's output; while an earlier attempt still writes it (its lease is renewed),
the retry is refused, and a killed attempt's lease expires after ``io.lease_seconds`` (3 minutes: keep
it well under the retry delay).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import re
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, CronDataIntervalTimetable, ObjectStoragePath, TriggerRule, Variable, task
from airflow.sdk.configuration import conf as airflow_conf

DAG_ID = "retrieval_daily"
SPARK_CONN_ID = "retrieval_spark"
SETTINGS_VARIABLE = "retrieval_pipeline"
log = logging.getLogger(__name__)

# the Airflow config section [retrieval]: scheduling settings (the module docstring)
RETRIES = airflow_conf.getint("retrieval", "retries", fallback=2)
RETRY_DELAY = dt.timedelta(minutes=airflow_conf.getfloat("retrieval", "retry_delay_minutes", fallback=10))
CATCHUP_DAYS = airflow_conf.getint("retrieval", "catchup_days", fallback=7)
QUERY_WAIT = dt.timedelta(minutes=airflow_conf.getfloat("retrieval", "query_wait_minutes", fallback=360))
GALLERY_WAIT = dt.timedelta(minutes=airflow_conf.getfloat("retrieval", "gallery_wait_minutes", fallback=30))
POKE_INTERVAL = dt.timedelta(seconds=airflow_conf.getfloat("retrieval", "poke_interval_seconds", fallback=300))
if CATCHUP_DAYS < 1:
    raise ValueError(f"[retrieval] catchup_days must be >= 1 (the days a catch-up may reach back), got {CATCHUP_DAYS}")
# the catch-up window: the scheduler creates no run before this (a moving start date; the module docstring)
START_DATE = dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) \
    - dt.timedelta(days=CATCHUP_DAYS)
DROP_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}$")     # a drop folder: <gallery_input>/YYYY-MM-DD


def s(key: str) -> str:
    """Template of a required setting (rendering fails, naming the key, when it is missing)."""
    return "{{ var.json.%s['%s'] }}" % (SETTINGS_VARIABLE, key)


def day(key: str, *parts: str, date: str = "{{ ds }}") -> str:
    """Template of a day's directory under a setting: ``<setting>/<part>/.../<date>`` (the run's ds)."""
    return "/".join([s(key), *parts, date])


def optional(key: str) -> str:
    """Jinja expression of an optional setting (None when missing)."""
    return "var.json.%s.get('%s')" % (SETTINGS_VARIABLE, key)


def set_when(config_key: str, test: str, value: str) -> str:
    """Template of ONE job argument: ``--set=<config_key>=<value>`` when the Jinja expression ``test``
    is true, else ``--conf=<retrieval_conf>`` again (a no-op: the same overlay applied twice), so that
    an unset optional key leaves the job's configuration as ``retrieval_conf`` has it."""
    return "{%% if %s %%}--set=%s=%s{%% else %%}--conf=%s{%% endif %%}" % (
        test, config_key, value, s("retrieval_conf"))


def gallery_features_url(work_root: str, drop: str) -> str:
    """The features of gallery drop ``drop`` (YYYY-MM-DD): what ``extract_gallery`` writes
    (``DROP_FEATURES`` renders the same string) and what the index records as its input."""
    return f"{work_root}/gallery_features/{drop}"


DROP = "{{ task.drop }}"        # the gallery drop (YYYY-MM-DD) of one mapped extract_gallery
DROP_FEATURES = day("work_root", "gallery_features", date=DROP)
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
# placeholder: "--features <url>" for each new gallery drop, from new_gallery_drops' XCom at run time
NEW_GALLERY_FEATURES = "<--features of each new gallery drop>"
AFTER_BRANCH = TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS   # one of a branch's two alternatives is skipped
AFTER_SENSOR = TriggerRule.NONE_FAILED                   # the gallery sensor is skipped when the drop is late

# Every Spark stage: task id -> the job file (jobs/<job>) and its arguments (templates; each task
# adds COMMON_ARGS). ``extract_gallery`` runs once per new gallery drop (``{{ task.drop }}``).
STAGES: dict[str, dict[str, Any]] = {
    "fit": {"job": "fit.py", "args": ["--input", FIT_INPUT, "--output", s("model")]},
    "extract_background": {"job": "extract.py", "args": [
        "--input", s("background_input"), "--output", BACKGROUND_FEATURES, "--role", "gallery", *MODEL_ARGS]},
    "extract_gallery": {"job": "extract.py", "args": [
        "--input", day("gallery_input", date=DROP), "--output", DROP_FEATURES, "--role", "gallery", *MODEL_ARGS]},
    "index": {"job": "index.py", "args": [NEW_GALLERY_FEATURES, "--output", s("index")]},
    "index_append": {"job": "index.py", "args": [NEW_GALLERY_FEATURES, "--output", s("index"), "--append"]},
    "extract_queries": {"job": "extract.py", "args": [
        "--input", day("query_input"), "--output", QUERY_FEATURES, "--role", "query", *MODEL_ARGS]},
    "search": {"job": "search.py", "args": [
        "--queries", QUERY_FEATURES, "--index", s("index"), "--output", RESULTS, *MODEL_ARGS, *NORMALIZE_ARGS]},
    "report": {"job": "report.py", "args": [
        "--results", RESULTS, "--output", REPORT,
        "--truth", "{{ var.json.%s.get('truth') or '' }}" % SETTINGS_VARIABLE, *REPORT_ARGS]},
}


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


def holds_files(path: ObjectStoragePath) -> bool:
    return path.exists() and path.is_dir() and any(True for _ in path.iterdir())


def indexed_features(conf: dict[str, Any]) -> set[str] | None:
    """The feature outputs the index was built from (its manifest's builds), None without an index."""
    # the index's marker; indexes built before 0.2 named it manifest.json
    for name in ("_manifest.json", "manifest.json"):
        marker = storage_path(f"{conf['index']}/{name}", conf)
        if marker.exists():
            manifest = json.loads(marker.read_text())
            urls = {u for b in manifest.get("builds", []) for u in b.get("features", [])}
            urls |= {f["output"] for f in manifest.get("feature_files", []) if f.get("output")}
            return {u.rstrip("/") for u in urls}
    return None


class SparkStage(SparkSubmitOperator):
    """spark-submit of one stage. ``drop``: the gallery drop a mapped ``extract_gallery`` works on
    (``{{ task.drop }}`` in its arguments); an argument that renders to a list (an XCom of
    arguments) is spliced into the command line."""

    def __init__(self, *, drop: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.drop = drop

    def execute(self, context: Any) -> None:
        self.application_args = [a for arg in self.application_args or []
                                 for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
        return super().execute(context)


def stage_kwargs(task_id: str, new_features: Any = None) -> dict[str, Any]:
    """The operator arguments of ``STAGES[task_id]``; ``new_features`` replaces the
    ``NEW_GALLERY_FEATURES`` placeholder."""
    stage = STAGES[task_id]
    args = [new_features if a == NEW_GALLERY_FEATURES else a for a in stage["args"]]
    if NEW_GALLERY_FEATURES in args:
        raise ValueError(f"{task_id}: its arguments need the new gallery features (new_features)")
    return {"task_id": task_id, "conn_id": SPARK_CONN_ID, "application": f"{s('jobs_dir')}/{stage['job']}",
            "properties_file": s("spark_properties"),
            "name": f"retrieval-{task_id}-" + (DROP if task_id == "extract_gallery" else "{{ ds }}"),
            "application_args": [*args, *COMMON_ARGS]}


def spark_job(task_id: str, new_features: Any = None, **kwargs: Any) -> SparkStage:
    return SparkStage(**stage_kwargs(task_id, new_features), **kwargs)


def drop_sensor(key: str, conf: dict[str, Any], ds: str, wait: dt.timedelta) -> bool:
    """One poke of a drop sensor: does ``<conf[key]>/<ds>`` hold files yet?"""
    path = storage_path(f"{conf[key]}/{ds}", conf)
    if holds_files(path):
        log.info("drop %s is there", path)
        return True
    log.info("drop %s is not there yet: waiting (poke every %s, up to %s in all)", path, POKE_INTERVAL, wait)
    return False


with DAG(
    dag_id=DAG_ID,
    description="extract the new gallery drops -> extend the index -> extract + search the day's queries "
                "-> audit report",
    # the run of day DS starts when DS is over (00:00 UTC of DS + 1), its drops complete: Airflow 3's
    # "@daily" (a CronTriggerTimetable) would start it at 00:00 of DS itself
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=START_DATE,
    catchup=True,          # missed days run, in order, one at a time, back to START_DATE at most
    max_active_runs=1,
    # Airflow config section [retrieval] (or AIRFLOW__RETRIEVAL__RETRIES=...): retries of every task
    default_args={"retries": RETRIES, "retry_delay": RETRY_DELAY},
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

    @task.sensor(task_id="wait_for_queries", trigger_rule=AFTER_BRANCH, mode="reschedule",
                 poke_interval=POKE_INTERVAL, timeout=QUERY_WAIT, soft_fail=False)
    def wait_for_queries(ds: str | None = None) -> bool:
        """The day's query drop: waits up to query_wait_minutes, then fails the run (see the docstring)."""
        return drop_sensor("query_input", settings(), ds, QUERY_WAIT)

    @task.sensor(task_id="wait_for_gallery", trigger_rule=AFTER_BRANCH, mode="reschedule",
                 poke_interval=POKE_INTERVAL, timeout=GALLERY_WAIT, soft_fail=True)
    def wait_for_gallery(ds: str | None = None) -> bool:
        """The day's gallery drop: a short wait, then skipped (a later run indexes a late drop)."""
        return drop_sensor("gallery_input", settings(), ds, GALLERY_WAIT)

    @task(task_id="new_gallery_drops", trigger_rule=AFTER_SENSOR)
    def new_gallery_drops(ds: str | None = None, ti: Any = None) -> list[str]:
        """Every gallery drop up to ``ds`` that holds files and is not in the index yet (the day's,
        late ones, missed days'), oldest first; the XCom ``features``: the index's arguments for them."""
        conf = settings()
        root = storage_path(conf["gallery_input"], conf)
        indexed = indexed_features(conf) or set()
        drops, ignored = [], []
        for path in sorted(root.iterdir(), key=lambda p: p.name) if root.exists() else []:
            if not DROP_NAME.match(path.name):
                ignored.append(path.name)
            elif path.name <= ds and gallery_features_url(conf["work_root"], path.name) not in indexed \
                    and holds_files(path):
                drops.append(path.name)
        if ignored:
            log.warning("ignored under %s (not a YYYY-MM-DD drop): %s", root, ", ".join(ignored[:10]))
        late = [d for d in drops if d != ds]
        log.info("gallery drops to index: %s%s", drops or "none",
                 f" (from earlier days, late or missed: {', '.join(late)})" if late else "")
        ti.xcom_push(key="features",
                     value=[a for d in drops for a in ("--features", gallery_features_url(conf["work_root"], d))])
        return drops

    @task.branch(task_id="check_new_gallery")
    def check_new_gallery(drops: list[str]) -> str:
        """Extract and index when any gallery drop is not in the index yet."""
        if drops:
            return "extract_gallery"
        log.info("no new gallery drop: the index is searched as it is")
        return "no_new_gallery"

    @task.branch(task_id="choose_index_mode")
    def choose_index_mode() -> str:
        """Append to the index when it exists (same trained quantizer), else build it."""
        return "index" if indexed_features(settings()) is None else "index_append"

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

    fit = spark_job("fit")
    model_ready = EmptyOperator(task_id="model_ready")
    extract_background = spark_job("extract_background")
    background_ready = EmptyOperator(task_id="background_ready")
    new_drops = new_gallery_drops()
    extract_gallery = SparkStage.partial(**stage_kwargs("extract_gallery")).expand(drop=new_drops)
    index_build = spark_job("index", new_features=new_drops["features"])
    index_append = spark_job("index_append", new_features=new_drops["features"])
    no_new_gallery = EmptyOperator(task_id="no_new_gallery")
    extract_queries = spark_job("extract_queries")
    search = spark_job("search", trigger_rule=AFTER_BRANCH)
    report_task = spark_job("report")

    model_branch = check_model()
    gallery_sensor = wait_for_gallery()
    query_sensor = wait_for_queries()
    gallery_branch = check_new_gallery(new_drops)
    index_branch = choose_index_mode()
    background_branch = check_background()
    model_branch >> [fit, model_ready]
    [fit, model_ready] >> gallery_sensor              # the model exists before anything is encoded
    [fit, model_ready] >> query_sensor
    [fit, model_ready] >> background_branch
    gallery_sensor >> new_drops
    gallery_branch >> [extract_gallery, no_new_gallery]
    query_sensor >> extract_queries
    extract_gallery >> index_branch >> [index_build, index_append]
    background_branch >> [extract_background, background_ready]
    [index_build, index_append, no_new_gallery, extract_queries, extract_background, background_ready] >> search
    search >> report_task >> publish_summary()
