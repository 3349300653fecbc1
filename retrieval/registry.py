"""The stage registry: every stage of the pipeline, in pipeline order, and what is derived from it.

Each entry of :data:`STAGE_MODULES` names the module that declares a stage's
:class:`~retrieval.stage.Stage` as ``STAGE``. The command line (:mod:`retrieval.cli`), the
``jobs/<stage>.py`` entry points, the configuration's validation (:func:`load_config`), the README's
stage table (:func:`stage_table`) and the stage-name tests read it. Adding a stage: its package
(with ``stage.py``) plus one line here (then ``python -m retrieval.registry --write-jobs`` writes its
``jobs/<stage>.py``; docs/architecture.md has a worked example).

This module sits above the stages (it imports them); the stages never import it. It installs
:func:`rules` in :mod:`retrieval.config` (``config.use_rules``) when imported, which
``retrieval/__init__.py`` does, so every configuration is checked with every stage's rules.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Any, Iterable, Mapping

from retrieval import config as config_mod
from retrieval.stage import Stage

# the module of each stage's STAGE (a stage's package or module, or a recipe), in pipeline order
STAGE_MODULES: list[str] = [
    "retrieval.recipes.run",        # the one command: the stages below, chained
    "retrieval.extract.stage",
    "retrieval.fit.stage",
    "retrieval.index.stage",
    "retrieval.search.stage",
    "retrieval.duplicates.stage",
    "retrieval.remove.stage",
    "retrieval.pdq.stage",
    "retrieval.evaluate",
    "retrieval.report.stage",
    "retrieval.train.stage",
    "retrieval.plan",
    "retrieval.export",
]

# extra stage modules (a user's own stages, a test's), comma-separated, added after the built-in ones
PLUGINS_ENV = "RETRIEVAL_STAGES"

# sections of the configuration that no stage owns
SHARED_SECTIONS = ("spark", "io", "model", "preprocess")


@functools.lru_cache(maxsize=None)
def _load(modules: tuple[str, ...]) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    names: set[str] = set()
    for module in modules:
        stage = getattr(importlib.import_module(module), "STAGE", None)
        if not isinstance(stage, Stage):
            raise TypeError(f"{module} declares no STAGE (a retrieval.stage.Stage)")
        for name in (stage.name, *stage.aliases, *stage.job_aliases):
            if name in names:
                raise ValueError(f"stage name {name!r} is declared twice (second: {module})")
            names.add(name)
        if stage.section is not None and any(s.section == stage.section for s in stages.values()):
            raise ValueError(f"config section {stage.section!r} is owned by two stages (second: {module})")
        stages[stage.name] = stage
    return stages


def stages() -> dict[str, Stage]:
    """name -> :class:`Stage`, in pipeline order (then the modules named by ``$RETRIEVAL_STAGES``)."""
    plugins = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    return _load(tuple(STAGE_MODULES + [m for m in plugins if m not in STAGE_MODULES]))


def get(name: str) -> Stage:
    """The stage called ``name`` (or an old name of it)."""
    all_stages = stages()
    if name in all_stages:
        return all_stages[name]
    for stage in all_stages.values():
        if name in stage.aliases or name in stage.job_aliases:
            return stage
    raise KeyError(f"no stage {name!r} ({', '.join(all_stages)})")


def rules(selected: Iterable[Stage] | None = None) -> config_mod.Rules:
    """The configuration rules the stages declare (checks, null-default types, own sections)."""
    checks: dict[str, Any] = {}
    nullable: dict[str, type] = {}
    sections: dict[str, Mapping[str, Any]] = {}
    for stage in (stages().values() if selected is None else selected):
        checks.update(stage.checks)
        nullable.update(stage.nullable)
        if stage.defaults is not None:
            sections[stage.section] = stage.defaults
    return config_mod.Rules(checks=checks, nullable=nullable, sections=sections)


def load_config(conf_files: Iterable[str] = (), sets: Iterable[str] = (),
                overrides: Mapping[str, Any] | None = None) -> config_mod.Config:
    """The configuration, validated with every stage's rules (what :func:`retrieval.config.load` does
    once this module is imported)."""
    return config_mod.load(conf_files, sets, overrides, rules=rules())


config_mod.use_rules(rules)     # config.load validates with the registered stages' rules


# ---------------------------------------------------------------------------------------------
# what is generated from the registry
JOB_TEMPLATE = '''"""`retrieval {name}` as a Spark job: {help}.

    spark-submit --master local[*] jobs/{name}.py {usage}

Options: `retrieval {name} --help`. On a cluster: docs/cluster.md.
"""
from retrieval.cli import run_job

if __name__ == "__main__":
    run_job(__file__)
'''


def job_file_text(stage: Stage, name: str | None = None) -> str:
    """The text of ``jobs/<name>.py`` (default: the stage's name; an old name gets a deprecation
    line): a thin ``spark-submit`` entry point calling the CLI."""
    text = JOB_TEMPLATE.format(name=stage.name, help=stage.help, usage=stage.usage).replace(" \n", "\n")
    if name is not None and name != stage.name:
        text = text.replace(f"jobs/{stage.name}.py", f"jobs/{name}.py", 1).replace(
            "Options:", f"Deprecated name (removed in 0.3): use jobs/{stage.name}.py.\n\nOptions:", 1)
    return text


def write_jobs(jobs_dir: str) -> list[str]:
    """Write ``jobs/<stage>.py`` for every stage (and the old names'); returns the files written."""
    written = []
    for stage in stages().values():
        for name in (stage.name, *stage.job_aliases):
            path = os.path.join(jobs_dir, name + ".py")
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(job_file_text(stage, name))
            written.append(path)
    return written


def stage_table() -> str:
    """The README's stage table (markdown), from the registry."""
    rows = ["| stage | command | Spark job | what it does |", "|---|---|---|---|"]
    for stage in stages().values():
        command = f"`retrieval {stage.name} {stage.usage}`".replace(" `", "`").replace("|", "\\|")
        rows.append(f"| {stage.name} | {command} | `jobs/{stage.name}.py` | {stage.help} |")
    return "\n".join(rows)


if __name__ == "__main__":    # pragma: no cover - developer tool
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if sys.argv[1:] == ["--write-jobs"]:
        print("\n".join(write_jobs(os.path.join(root, "jobs"))))
    elif sys.argv[1:] == ["--table"]:
        print(stage_table())
    else:
        raise SystemExit("usage: python -m retrieval.registry --write-jobs | --table")
