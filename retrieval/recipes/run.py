"""``retrieval run --gallery URL --queries URL --output URL``: one command for one's own images.

The whole pipeline on one engine (one Spark session for every stage), each stage's output under
``--output``:

    model/fitted.pt        retrieval fit       (whitening on the gallery + the --background images, adapter
                                                re-fit on the gallery; --no-fit: skipped)
    background_features/   retrieval extract   (the background set, with the fitted model)
    gallery_features/      retrieval extract --role gallery
    query_features/        retrieval extract --role query
    index/                 retrieval index
    results/               retrieval search    (normalised against the background)
    eval/                  retrieval evaluate  (only with --truth)
    report/                retrieval report    (flags at the evaluation's 90% precision with --truth)
    _manifest.json         this run: every stage's output, skipped or run, and the report's path

``--output`` must be empty or a run of the same gallery, queries, background and truth (else
``--overwrite``). A rerun skips each stage whose output is complete for the same identity (inputs and
the settings that change it: :func:`retrieval.outputs.identity`) when nothing it reads changed;
extraction always runs, incrementally; a changed setting reruns the stages it changes and those after.
The background: ``--background URL`` (images, or a feature output of the same model), else the
background images the package ships (:func:`retrieval.recipes.background.shipped_background`).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from retrieval import fsio, outputs
from retrieval.config import Config
from retrieval.stage import Stage, arg

log = logging.getLogger(__name__)


def same_identity(url: str, ident: dict, file: bool = False) -> bool:
    """``url`` holds an output of this identity (read only)."""
    try:
        return outputs.check(url, ident, file=file) is not None
    except outputs.OutputExistsError:
        return False


class Runner:
    """Runs the stages of one ``retrieval run`` in order on one engine. A stage reruns when its output is
    not complete for the same inputs and settings, or when a stage it reads from changed in this run;
    extraction always runs, incrementally (it recomputes only shards whose images changed)."""

    def __init__(self, output: str, cfg: Config, engine: Any) -> None:
        self.output, self.cfg, self.engine = output, cfg, engine
        self.steps: dict[str, dict[str, Any]] = {}
        self.changed: set[str] = set()

    def url(self, name: str) -> str:
        return fsio.join(self.output, name)

    def _record(self, name: str, stage: str, t0: float, skipped: bool, changed: bool,
                output: str | None = None) -> None:
        self.steps[name] = {"stage": stage, "output": output or self.url(name), "skipped": skipped}
        if not skipped:
            self.steps[name]["seconds"] = round(time.monotonic() - t0, 1)
        if changed:
            self.changed.add(name)

    def extract(self, name: str, input_url: str, role: str, cfg: Config, deps: tuple[str, ...] = ()) -> dict:
        from retrieval.extract.job import extract

        t0 = time.monotonic()
        url = self.url(name)
        cfg = cfg.with_overrides({"extract.role": role})
        if fsio.exists(url) and not same_identity(url, outputs.identity("extract", cfg, [input_url], role)):
            cfg = cfg.with_overrides({"extract.mode": "overwrite"})     # other settings: recomputed whole
        log.info("run: %s (%s) -> %s", name, role, url)
        m = extract(input_url, url, cfg, self.engine)
        self._record(name, "extract", t0, skipped=False,
                     changed=m["counts"]["shards_run"] > 0 or any(d in self.changed for d in deps))
        return m

    def step(self, name: str, stage: str, inputs: list[str | None], work, cfg: Config,
             deps: tuple[str, ...]) -> dict:
        """``work(url, cfg)`` unless the output is complete for the same identity and nothing it reads
        from changed in this run; the run owns the folder, so a rerun replaces it."""
        url = self.url(name)
        t0 = time.monotonic()
        same = same_identity(url, outputs.identity(stage, cfg, inputs))      # read once
        done = outputs.find(url, stage) if same and not any(d in self.changed for d in deps) else None
        if done is not None and stage == "search" and done.get("index_takedown_batches", 0) != len(
                (outputs.read(inputs[1], "index").get("takedowns") or {}).get("batches", [])):
            done = None         # the index changed in place since (retrieval remove / index --compact)
        if done is not None:
            log.info("run: %s is complete for the same inputs and settings: skipped (%s)", name, url)
            self._record(name, stage, t0, skipped=True, changed=False)
            return done
        replace = not same and fsio.exists(url)
        log.info("run: %s -> %s%s", name, url, " (other inputs or settings: replaced)" if replace else "")
        m = work(url, cfg, replace)
        self._record(name, stage, t0, skipped=False, changed=True)
        return m

    def fit(self, gallery: str) -> Config:
        """The gallery-fitted model (``model.checkpoint`` of every later stage); the configured model
        as it is when the gallery is too small to fit (with a warning)."""
        from retrieval.fit.job import TooFewImagesError, fit

        url = self.url("model/fitted.pt")
        t0 = time.monotonic()
        same = (fsio.exists(url + ".card.json")
                and same_identity(url, outputs.identity("fit", self.cfg, [gallery]), file=True))
        if same:
            log.info("run: the fitted model is complete for the same gallery and settings: skipped (%s)", url)
        else:
            log.info("run: fit -> %s", url)
            try:
                fit(gallery, url, self.cfg, self.engine, overwrite=True)
            except TooFewImagesError as exc:
                log.warning("run: %s; using the configured model as it is (no fit)", exc)
                self.steps["fit"] = {"stage": "fit", "output": None, "skipped": True, "reason": str(exc)}
                return self.cfg
        self._record("fit", "fit", t0, skipped=same, changed=not same, output=url)
        return self.cfg.with_overrides({"model.checkpoint": url})


@outputs.leased
def run_all(gallery: str, queries: str, output: str, cfg: Config, engine: Any, background: str | None = None,
            truth: str | None = None, fit: bool = True, overwrite: bool = False, verify: bool = True) -> dict:
    """Fit, extract (background, gallery, queries), index, normalised search (with geometric verification
    of each query's top rows: ``search.geometric.top: auto`` is on here when OpenCV is importable and
    ``verify``; :func:`~retrieval.search.geometric.run_top`), [evaluate], report; returns
    the run's manifest (also written to ``<output>/_manifest.json``). ``output`` must be empty or a run of
    the same gallery, queries, background and truth (else ``overwrite``); inside it, the run replaces
    what its new settings change."""
    from retrieval.evaluate import evaluate
    from retrieval.index.build import build_index
    from retrieval.recipes.background import resolve_background
    from retrieval.report.job import build_report
    from retrieval.search.geometric import run_top
    from retrieval.search.job import search

    from retrieval.engine import as_engine

    cfg = cfg.with_overrides({"search.geometric.top": run_top(cfg["search.geometric.top"], verify)})
    engine = as_engine(engine)      # one engine, one session, for every stage (its manifest records it)
    outputs.configure_and_check_writable(output, cfg["io.storage_options"])
    outputs.claim(output, outputs.identity("run", cfg, [gallery, queries, background, truth]), cfg, overwrite)
    outputs.begin(output)       # the run's marker goes until every step is complete again
    t0 = time.monotonic()
    run = Runner(output, cfg, engine)
    bg_url, bg_images = resolve_background(background)
    if background is not None and bg_images is not None and not cfg["fit.background"]:
        # the user's background images join the whitening fit (the shipped textures do not: unlike
        # everyday photos, they would understate the false-match rates; docs/quality.md)
        run.cfg = cfg = cfg.with_overrides({"fit.background": bg_images})
    model_cfg = run.fit(gallery) if fit else cfg
    if bg_images is not None:
        bg_url = run.url("background_features")
        run.extract("background_features", bg_images, "gallery", model_cfg, deps=("fit",))
    run.extract("gallery_features", gallery, "gallery", model_cfg, deps=("fit",))
    run.extract("query_features", queries, "query", model_cfg, deps=("fit",))
    gallery_features, query_features, index = (run.url(n) for n in ("gallery_features", "query_features", "index"))
    run.step("index", "index", [gallery_features],
             lambda url, c, replace: build_index([gallery_features], url, c.with_overrides(
                 {"index.mode": "overwrite"}) if replace else c, engine), model_cfg, deps=("gallery_features",))
    search_cfg = model_cfg.with_overrides({"search.normalize.background": bg_url})
    results_url = run.url("results")
    results = run.step("results", "search", [query_features, index],
                       lambda url, c, replace: search(query_features, index, url, c, engine, overwrite=replace),
                       search_cfg, deps=("query_features", "index", "background_features"))
    report_cfg = search_cfg
    if truth:
        run.step("eval", "evaluate", [results_url, truth],
                 lambda url, c, replace: evaluate(results_url, truth, url, c, overwrite=replace), search_cfg,
                 deps=("results",))
        report_cfg = search_cfg.with_overrides({"report.threshold": {
            "from_evaluation": fsio.join(run.url("eval"), "metrics.json"), "precision": 0.9}})
    report = run.step("report", "report", [results_url, truth],
                      lambda url, c, replace: build_report(results_url, url, c, truth_url=truth, overwrite=replace),
                      report_cfg, deps=("results", "eval"))
    return outputs.commit(output, "run", {
        "gallery": gallery, "queries": queries, "background": bg_url, "truth": truth, "fit": fit,
        "steps": [{"name": name, **step} for name, step in run.steps.items()], "report": fsio.join(run.url("report"), "report.html"),
        "counts": (report or {}).get("counts"), "results": results_url,
        "model_version": results.get("model_version"),
        "timings": {"total_s": round(time.monotonic() - t0, 1)}}, engine=engine, cfg=report_cfg)


def _run(inputs: Mapping[str, Any], output: str | None, cfg: Config, engine: Any) -> dict:
    return run_all(inputs["gallery"], inputs["queries"], output, cfg, engine, background=inputs.get("background"),
                   truth=inputs.get("truth"), fit=not inputs.get("no_fit"), overwrite=bool(inputs.get("overwrite")),
                   verify=not inputs.get("no_verify"))


def _summary(m: dict, inputs: Mapping[str, Any], output: str | None) -> dict:
    counts = m.get("counts") or {}
    return {"output": output, "report": m["report"], "results": m["results"], "model_version": m["model_version"],
            "steps": {s["name"]: ("skipped" if s["skipped"] else f"{s.get('seconds', 0)} s") for s in m["steps"]},
            "flagged": {k: counts.get(k) for k in ("queries", "flagged_queries", "flagged_matches")},
            "timings": m["timings"]}


STAGE = Stage(
    name="run",
    help="one command for your own images: fit, extract, index, normalised search, report",
    usage="--gallery URL --queries URL --output URL",
    args=(
        arg("--gallery", required=True, help="gallery images (the known images): directory, CSV/Parquet manifest, "
                                             "or Parquet with bytes"),
        arg("--queries", required=True, help="query images (the uploads to check), any extract input"),
        arg("--output", required=True, help="output URL: every stage's output goes under it"),
        arg("--background", default=None,
            help="unrelated images (or their gallery-role feature output) for score normalisation and "
                 "false-match rates; default: the background images the package ships"),
        arg("--truth", default=None, help="CSV of true pairs (query_id, gallery_id): adds evaluate, and the "
                                          "report flags at its 90%%-precision threshold"),
        arg("--no-fit", action="store_true", help="use the configured model as it is (no retrieval fit)"),
        arg("--no-verify", action="store_true",
            help="no geometric verification of the top matches (on by default when OpenCV is installed: "
                 "search.geometric.top auto; a number set for it in the config replaces the default 10)"),
    ),
    run=_run,
    summary=_summary,
)
