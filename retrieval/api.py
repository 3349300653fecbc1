"""The Python API: the pipeline from a notebook or a scheduler's Python task, typed, with the same
behaviour and outputs as the command line (each function runs the registered stage of that name).

    from retrieval import api

    report = api.run("photos/gallery", "photos/uploads", "out/")         # the whole pipeline
    print(report["report"])                                                # out/report/report.html

    cfg = api.load_config(sets=["extract.num_shards=4"])
    api.extract("photos/gallery", "out/gallery_features", role="gallery", config=cfg)
    api.index(["out/gallery_features"], "out/index", config=cfg)
    api.search("photos/uploads", "out/index", "out/results", config=cfg, engine="spark")

``engine``: ``"local"`` (this process, no JVM: the default here), ``"spark"`` (a local Spark session
from ``spark.*`` config, stopped afterwards), or an engine / Spark session you already hold (kept
open). Every function returns the stage's manifest (the ``_manifest.json`` it wrote).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

from retrieval import registry
from retrieval.config import Config
from retrieval.engine import Engine, as_engine, open_engine


def load_config(conf_files: Iterable[str] = (), sets: Iterable[str] = (),
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults + YAML overlays + ``key=value`` items, validated (as ``--conf`` / ``--set``)."""
    return registry.load_config(conf_files, sets, overrides)


@contextlib.contextmanager
def _engine(engine: Any, cfg: Config) -> Iterator[Engine]:
    if isinstance(engine, str):
        with open_engine(engine, cfg) as opened:
            yield opened
    else:
        yield as_engine(engine)


def run_stage(name: str, inputs: Mapping[str, Any], output: str | None, config: Config | None = None,
              engine: Any = "local") -> Any:
    """Run the registered stage ``name`` (its ``run(inputs, output, settings, engine)``)."""
    stage = registry.get(name)
    cfg = config if config is not None else load_config()
    with _engine(engine, cfg) as eng:
        return stage.run(inputs, output, stage.settings(cfg), eng)


def run(gallery: str, queries: str, output: str, *, background: str | None = None, truth: str | None = None,
        fit: bool = True, config: Config | None = None, engine: Any = "local") -> dict:
    """``retrieval run``: fit, extract, index, normalised search and report under ``output``; the
    returned manifest's ``report`` is the report page's URL."""
    return run_stage("run", {"gallery": gallery, "queries": queries, "background": background, "truth": truth,
                             "no_fit": not fit}, output, config, engine)


def extract(input: str, output: str, *, role: str = "gallery", config: Config | None = None,
            engine: Any = "local") -> dict:
    """``retrieval extract``: images -> feature shards (``role``: gallery or query)."""
    cfg = (config if config is not None else load_config()).with_overrides({"extract.role": role})
    return run_stage("extract", {"input": input}, output, cfg, engine)


def fit(input: str, output: str, *, config: Config | None = None, engine: Any = "local") -> dict:
    """``retrieval fit``: the model fitted to a gallery sample -> a checkpoint (returns its card)."""
    return run_stage("fit", {"input": input}, output, config, engine)


def index(features: Sequence[str], output: str, *, append: bool = False, config: Config | None = None,
          engine: Any = "local") -> dict:
    """``retrieval index``: gallery feature outputs -> a sharded IVF-PQ index."""
    return run_stage("index", {"features": list(features), "append": append, "merge_ondisk": False}, output,
                     config, engine)


def search(queries: str, index: str, output: str, *, config: Config | None = None, engine: Any = "local") -> dict:
    """``retrieval search``: query images or query features against an index -> match rows."""
    return run_stage("search", {"queries": queries, "index": index}, output, config, engine)


def evaluate(results: str, truth: str, output: str | None = None, *, exact: str | None = None,
             config: Config | None = None) -> dict:
    """``retrieval evaluate``: metrics of a search output against a truth CSV."""
    return run_stage("evaluate", {"results": results, "truth": truth, "exact": exact}, output, config)


def report(results: str, output: str, *, truth: str | None = None, config: Config | None = None) -> dict:
    """``retrieval report``: the audit report of a search output (returns its summary)."""
    return run_stage("report", {"results": results, "truth": truth}, output, config)


def remove(index: str, ids: str, *, restore: bool = False, config: Config | None = None,
           engine: Any = "local") -> dict:
    """``retrieval remove``: take the images of ``ids`` down from ``index`` at once (``restore``: lift
    their takedown); returns the index manifest (docs/lifecycle.md)."""
    return run_stage("remove", {"index": index, "ids": ids, "restore": restore}, None, config, engine)


def compact(index: str, *, config: Config | None = None, engine: Any = "local") -> dict:
    """``retrieval index --compact``: drop the removed rows of ``index`` physically."""
    return run_stage("index", {"features": None, "compact": True}, index, config, engine)
