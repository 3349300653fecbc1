"""``retrieval run --gallery URL --queries URL --output URL``: one command for one's own images.

The whole pipeline on one engine (one Spark session for every stage), each stage's output under
``--output``:

    model/fitted.pt        retrieval fit       (whitening + adapter re-fit on the gallery; --no-fit: skipped)
    background_features/   retrieval extract   (the background set, with the fitted model)
    gallery_features/      retrieval extract --role gallery
    query_features/        retrieval extract --role query
    index/                 retrieval index
    results/               retrieval search    (normalised against the background)
    eval/                  retrieval evaluate  (only with --truth)
    report/                retrieval report    (flags at the evaluation's 90% precision with --truth)
    _manifest.json         this run: every stage's output, skipped or run, and the report's path

A rerun skips each stage whose output is complete for the same inputs and settings (the manifest's
recorded input URLs and config sections); a changed setting reruns that stage and those after it.
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

# the config sections whose values change each stage's output (besides its input URLs)
SECTIONS = {
    "fit": ("model", "preprocess", "fit"),
    "extract": ("model", "preprocess", "extract"),
    "index": ("model", "index"),
    "search": ("model", "preprocess", "search"),
    "evaluate": ("evaluate",),
    "report": ("report",),
}


def _same(recorded: Mapping[str, Any] | None, cfg: Config, stage: str) -> bool:
    return recorded is not None and all(recorded.get(s) == cfg[s].to_dict() for s in SECTIONS[stage])


def complete(url: str, stage: str, inputs: Mapping[str, Any], cfg: Config) -> dict | None:
    """The manifest of ``url`` when it is a complete ``stage`` output made from ``inputs`` (recorded
    manifest keys) with the same settings, else None."""
    m = outputs.find(url, stage)
    if m is None or any(m.get(k) != v for k, v in inputs.items()):
        return None
    return m if _same(m.get("config"), cfg, stage) else None


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

    def _record(self, name: str, stage: str, t0: float, skipped: bool, changed: bool) -> None:
        self.steps[name] = {"stage": stage, "output": self.url(name), "skipped": skipped}
        if not skipped:
            self.steps[name]["seconds"] = round(time.monotonic() - t0, 1)
        if changed:
            self.changed.add(name)

    def extract(self, name: str, input_url: str, role: str, cfg: Config, deps: tuple[str, ...] = ()) -> dict:
        from retrieval.extract.job import extract

        t0 = time.monotonic()
        log.info("run: %s (%s) -> %s", name, role, self.url(name))
        m = extract(input_url, self.url(name), cfg.with_overrides({"extract.role": role}), self.engine)
        self._record(name, "extract", t0, skipped=False,
                     changed=m["counts"]["shards_run"] > 0 or any(d in self.changed for d in deps))
        return m

    def step(self, name: str, stage: str, inputs: Mapping[str, Any], work, cfg: Config,
             deps: tuple[str, ...]) -> dict:
        url = self.url(name)
        t0 = time.monotonic()
        done = None if any(d in self.changed for d in deps) else complete(url, stage, inputs, cfg)
        if done is not None:
            log.info("run: %s is complete for the same inputs and settings: skipped (%s)", name, url)
            self._record(name, stage, t0, skipped=True, changed=False)
            return done
        log.info("run: %s -> %s", name, url)
        m = work(url, cfg)
        self._record(name, stage, t0, skipped=False, changed=True)
        return m

    def fit(self, gallery: str) -> Config:
        """The gallery-fitted model (``model.checkpoint`` of every later stage); the configured model
        as it is when the gallery is too small to fit (with a warning)."""
        from retrieval.fit.job import TooFewImagesError, fit

        url = self.url("model/fitted.pt")
        card = fsio.read_json(url + ".card.json") if fsio.exists(url + ".card.json") else None
        t0 = time.monotonic()
        same = card is not None and card.get("input") == gallery and _same(card.get("config"), self.cfg, "fit")
        if same:
            log.info("run: the fitted model is complete for the same gallery and settings: skipped (%s)", url)
        else:
            log.info("run: fit -> %s", url)
            try:
                fit(gallery, url, self.cfg, self.engine)
            except TooFewImagesError as exc:
                log.warning("run: %s; using the configured model as it is (no fit)", exc)
                self.steps["fit"] = {"stage": "fit", "output": None, "skipped": True, "reason": str(exc)}
                return self.cfg
        self.steps["fit"] = {"stage": "fit", "output": url, "skipped": same}
        if not same:
            self.steps["fit"]["seconds"] = round(time.monotonic() - t0, 1)
            self.changed.add("fit")
        return self.cfg.with_overrides({"model.checkpoint": url})


def run_all(gallery: str, queries: str, output: str, cfg: Config, engine: Any, background: str | None = None,
            truth: str | None = None, fit: bool = True) -> dict:
    """Fit, extract (background, gallery, queries), index, normalised search, [evaluate], report; returns
    the run's manifest (also written to ``<output>/_manifest.json``)."""
    from retrieval.evaluate import evaluate
    from retrieval.index.build import build_index
    from retrieval.recipes.background import resolve_background
    from retrieval.report.job import build_report
    from retrieval.search.job import search

    outputs.configure_and_check_writable(output, cfg["io.storage_options"])
    t0 = time.monotonic()
    run = Runner(output, cfg, engine)
    model_cfg = run.fit(gallery) if fit else cfg
    bg_url, bg_images = resolve_background(background)
    if bg_images is not None:
        bg_url = run.url("background_features")
        run.extract("background_features", bg_images, "gallery", model_cfg, deps=("fit",))
    run.extract("gallery_features", gallery, "gallery", model_cfg, deps=("fit",))
    run.extract("query_features", queries, "query", model_cfg, deps=("fit",))
    gallery_features, query_features, index = (run.url(n) for n in ("gallery_features", "query_features", "index"))
    run.step("index", "index", {}, lambda url, c: build_index([gallery_features], url, c, engine), model_cfg,
             deps=("gallery_features",))
    search_cfg = model_cfg.with_overrides({"search.normalize.background": bg_url})
    results_url = run.url("results")
    results = run.step("results", "search", {"queries": query_features, "index": index},
                       lambda url, c: search(query_features, index, url, c, engine), search_cfg,
                       deps=("query_features", "index", "background_features"))
    report_cfg = search_cfg
    if truth:
        run.step("eval", "evaluate", {"results": results_url, "truth": truth},
                 lambda url, c: evaluate(results_url, truth, url, c), search_cfg, deps=("results",))
        report_cfg = search_cfg.with_overrides({"report.threshold": {
            "from_evaluation": fsio.join(run.url("eval"), "metrics.json"), "precision": 0.9}})
    report = run.step("report", "report", {"results": results_url},
                      lambda url, c: build_report(results_url, url, c, truth_url=truth), report_cfg,
                      deps=("results", "eval"))
    return outputs.commit(output, "run", {
        "gallery": gallery, "queries": queries, "background": bg_url, "truth": truth, "fit": fit,
        "steps": [{"name": name, **step} for name, step in run.steps.items()], "report": fsio.join(run.url("report"), "report.html"),
        "counts": (report or {}).get("counts"), "results": results_url,
        "model_version": results.get("model_version"),
        "timings": {"total_s": round(time.monotonic() - t0, 1)}}, engine=engine, cfg=report_cfg)


def _run(inputs: Mapping[str, Any], output: str | None, cfg: Config, engine: Any) -> dict:
    return run_all(inputs["gallery"], inputs["queries"], output, cfg, engine, background=inputs.get("background"),
                   truth=inputs.get("truth"), fit=not inputs.get("no_fit"))


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
    ),
    run=_run,
    summary=_summary,
)
