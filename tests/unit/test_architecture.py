"""The package's layers point one way (issues 14, 21): core (config, fsio, schema, ...) -> model
(retrieval.model: the network, checkpoints and deltas, external model files, the ONNX runtime, export,
model_version) -> extract (retrieval.extract: preprocessing, inputs, the stage) -> index -> search ->
evaluate / report, and fit / training on top of extract. No import circle inside ``retrieval``.

The import graph is read from the source with :mod:`ast` (nothing is imported): every ``import`` and
``from ... import`` of a ``retrieval`` module, at module level AND inside functions (a lazy import is
still a dependency: it only moves the failure to run time), relative imports resolved, and
``from pkg import submodule`` counted as an import of the submodule.
"""
from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "retrieval")

# what the feature layer (retrieval.extract) must never import: the layers above it
ABOVE_FEATURES = ("retrieval.train", "retrieval.search", "retrieval.index", "retrieval.report",
                  "retrieval.evaluate")
# what the model layer (retrieval.model) must never import: every layer above core
ABOVE_MODEL = ("retrieval.extract", "retrieval.fit", *ABOVE_FEATURES, "retrieval.export", "retrieval.cli",
               "retrieval.plan")


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str   # path:line of the import statement

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst} ({self.where})"


def _modules(root: str = ROOT) -> dict[str, str]:
    """module name -> file, for every .py file under ``root`` (packages named by their __init__)."""
    base = os.path.dirname(root)
    mods = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = os.path.join(dirpath, fn)
            parts = os.path.relpath(path, base)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, str]) -> str | None:
    """The deepest known module ``name`` is, or lies in (``retrieval.x.attr`` -> ``retrieval.x``)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges(root: str = ROOT) -> tuple[dict[str, str], list[Edge]]:
    mods = _modules(root)
    top = os.path.basename(root)
    edges = []
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), filename=path)
        where = os.path.relpath(path, os.path.dirname(root))
        for node in ast.walk(tree):        # every import statement, module-level or inside a function
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:             # relative: from . import x / from ..a import b
                    up = package.split(".")
                    up = up[: len(up) - (node.level - 1)]
                    src = ".".join(up + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                # `from pkg import submodule` imports the submodule; `from mod import name`, the module
                targets = [f"{src}.{alias.name}" if f"{src}.{alias.name}" in mods else src
                           for alias in node.names]
            for target in targets:
                if target != top and not target.startswith(top + "."):
                    continue
                dst = _resolve(target, mods)
                if dst is not None and dst != mod:
                    edges.append(Edge(mod, dst, f"{where}:{node.lineno}"))
    return mods, edges


def find_cycles(mods, edges: list[Edge]) -> list[tuple[list[str], list[Edge]]]:
    """Each strongly connected component of more than one module (Tarjan), with one shortest import
    circle through it as the edges that make it."""
    graph: dict[str, dict[str, Edge]] = {m: {} for m in mods}
    for e in edges:
        graph[e.src].setdefault(e.dst, e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in components:     # a shortest circle through the component's first module (BFS)
        members, start = set(comp), comp[0]
        prev: dict[str, Edge] = {}
        frontier, seen, closing = [start], {start}, None
        while frontier and closing is None:
            nxt = []
            for v in frontier:
                for w, e in sorted(graph[v].items()):
                    if w == start:
                        closing = e
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        prev[w] = e
                        nxt.append(w)
                if closing is not None:
                    break
            frontier = nxt
        path = [closing]
        while path[0].src != start:
            path.insert(0, prev[path[0].src])
        cycles.append((comp, path))
    return cycles


def test_the_walker_sees_module_level_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "retrieval"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from retrieval.sub import b\n")                 # from pkg import submodule
    (pkg / "sub" / "b.py").write_text("def f():\n    from .c import g\n")       # function-local, relative
    (pkg / "sub" / "c.py").write_text("import os\n\ndef g():\n    import retrieval.a\n")
    (pkg / "d.py").write_text("from retrieval.sub.c import g\nfrom . import a\n")
    mods, edges = import_edges(str(pkg))
    pairs = {(e.src, e.dst) for e in edges}
    assert pairs == {("retrieval.a", "retrieval.sub.b"), ("retrieval.sub.b", "retrieval.sub.c"),
                     ("retrieval.sub.c", "retrieval.a"), ("retrieval.d", "retrieval.sub.c"),
                     ("retrieval.d", "retrieval.a")}
    cycles = find_cycles(mods, edges)
    assert [[(e.src, e.dst) for e in c] for _, c in cycles] == [
        [("retrieval.a", "retrieval.sub.b"), ("retrieval.sub.b", "retrieval.sub.c"),
         ("retrieval.sub.c", "retrieval.a")]]


def test_the_graph_of_retrieval_is_read():
    mods, edges = import_edges()
    pairs = {(e.src, e.dst) for e in edges}
    assert "retrieval.model.network" in mods and "retrieval.train.trainer" in mods
    assert ("retrieval.extract.job", "retrieval.extract.preprocess") in pairs      # module level
    assert ("retrieval.extract.job", "retrieval.extract.inputs") in pairs          # from pkg import mod
    assert ("retrieval.extract.job", "retrieval.model.checkpoints") in pairs     # function-local


def test_no_import_cycle_in_retrieval():
    mods, edges = import_edges()
    cycles = find_cycles(mods, edges)
    if cycles:
        pytest.fail("import cycles in retrieval/ (module-level and function-local imports):\n" + "\n".join(
            f"  {' -> '.join([c[0].src] + [e.dst for e in c])}   (circle among {', '.join(comp)})\n"
            + "\n".join(f"      {e}" for e in c) for comp, c in cycles))


def test_the_feature_layer_imports_nothing_above_it():
    _, edges = import_edges()
    bad = [e for e in dict.fromkeys(edges) if e.src.startswith("retrieval.extract")
           and any(e.dst == p or e.dst.startswith(p + ".") for p in ABOVE_FEATURES)]
    assert not bad, ("retrieval.extract must not import training / search / index / audit / evaluate:\n"
                     + "\n".join(f"  {e}" for e in bad))


# what no module outside the engine package (retrieval/engine/) may mention or import (issue 21): the
# engine decides where a stage runs, so nothing else touches a SparkSession or branches on the engine
SPARK_MENTIONS = re.compile(r"SparkSession|\bengine\.spark\b|\bis_spark\b|\bsparkContext\b")


def spark_leaks(root: str = ROOT) -> list[str]:
    """``module:line: what`` for every module under ``root`` outside its ``engine`` package that
    mentions a SparkSession, ``engine.spark``, ``is_spark`` or ``sparkContext`` (code, comment or
    docstring), or imports pyspark or the Spark engine's own modules (``engine.spark``,
    ``engine.session``, the old ``sparkutil``), at module level or inside a function."""
    top = os.path.basename(root)
    engine_pkg = f"{top}.engine"
    banned = ("pyspark", f"{top}.sparkutil", f"{engine_pkg}.session", f"{engine_pkg}.spark")
    leaks = []
    for mod, path in _modules(root).items():
        if mod == engine_pkg or mod.startswith(engine_pkg + "."):
            continue
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        for n, line in enumerate(text.splitlines(), 1):
            leaks += [f"{mod}:{n}: mentions {m.group(0)}" for m in SPARK_MENTIONS.finditer(line)]
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(text, filename=path)):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                src = ".".join(up + ([node.module] if node.module else []))
                names = [src] + [f"{src}.{alias.name}" for alias in node.names]
            leaks += [f"{mod}:{node.lineno}: imports {name}" for name in dict.fromkeys(names)
                      if any(name == b or name.startswith(b + ".") for b in banned)]
    return leaks


def test_the_spark_checker_catches_planted_leaks(tmp_path):
    pkg = tmp_path / "retrieval"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "stage").mkdir()
    for init in ("__init__.py", "engine/__init__.py", "stage/__init__.py"):
        (pkg / init).write_text("")
    # the engine package may do all of it
    (pkg / "engine" / "spark.py").write_text("import pyspark\n\ndef f(engine):\n"
                                             "    return engine.spark.sparkContext if engine.is_spark else None\n")
    (pkg / "engine" / "session.py").write_text('"""SparkSession helpers."""\n')
    # outside it, each of these is a leak
    (pkg / "stage" / "doc.py").write_text('"""Takes a SparkSession."""\n')
    (pkg / "stage" / "branch.py").write_text("def f(run):\n    if run.engine.is_spark:\n        pass\n")
    (pkg / "stage" / "attr.py").write_text("def f(engine):\n    return engine.spark\n")
    (pkg / "stage" / "lazy.py").write_text("def f():\n    from pyspark.sql import functions\n")
    (pkg / "stage" / "rel.py").write_text("from ..engine import session\n")
    (pkg / "stage" / "helper.py").write_text("from retrieval.engine.session import get_spark\n")
    (pkg / "old.py").write_text("import retrieval.sparkutil\n")
    # and these are not: the engine's public names, a Spark session in words
    (pkg / "stage" / "clean.py").write_text('"""Runs on an engine (a Spark session or None)."""\n'
                                            "from retrieval.engine import Stage, as_engine\n"
                                            "from retrieval import engine\n")
    leaks = spark_leaks(str(pkg))
    assert sorted({leak.split(":")[0] for leak in leaks}) == [
        "retrieval.old", "retrieval.stage.attr", "retrieval.stage.branch", "retrieval.stage.doc",
        "retrieval.stage.helper", "retrieval.stage.lazy", "retrieval.stage.rel"], leaks
    assert "retrieval.stage.lazy:2: imports pyspark.sql" in leaks
    assert "retrieval.stage.rel:1: imports retrieval.engine.session" in leaks
    assert "retrieval.stage.branch:2: mentions is_spark" in leaks


def test_spark_stays_behind_the_engine():
    """No module of retrieval/ outside retrieval/engine/ mentions a SparkSession, ``engine.spark``
    or ``is_spark``, nor imports pyspark or the Spark session helpers: every Spark plan is an
    engine method (issue 21)."""
    leaks = spark_leaks()
    assert not leaks, "Spark outside the engine package (retrieval/engine/):\n" + "\n".join(leaks)


def test_the_model_layer_imports_nothing_above_it():
    """retrieval.model (building, loading, exporting and versioning the descriptor model) sits below
    extract, fit, train and search, which all use it; it imports core modules only."""
    mods, edges = import_edges()
    assert "retrieval.model.network" in mods and "retrieval.model.version" in mods
    assert ("retrieval.search.queries", "retrieval.model.version") in {(e.src, e.dst) for e in edges}
    bad = [e for e in dict.fromkeys(edges) if e.src.startswith("retrieval.model")
           and any(e.dst == p or e.dst.startswith(p + ".") for p in ABOVE_MODEL)]
    assert not bad, ("retrieval.model must not import extract / fit / train / search / index / report / "
                     "evaluate / the drivers:\n" + "\n".join(f"  {e}" for e in bad))


# the stages, and each stage's job: the module holding its stage function, its Stage declaration and a
# package __init__ that re-exports the stage function. Readers of a stage's output live apart from
# its job (retrieval.extract.features, retrieval.search.results, retrieval.metrics) so that the next
# stage imports them, never the job.
STAGE_PACKAGES = ("retrieval.extract", "retrieval.fit", "retrieval.index", "retrieval.search",
                  "retrieval.report", "retrieval.train", "retrieval.evaluate", "retrieval.remove", "retrieval.duplicates")
JOB_MODULES = {
    "retrieval.extract": ("retrieval.extract.job", "retrieval.extract.stage"),
    "retrieval.fit": ("retrieval.fit.job", "retrieval.fit.stage"),
    "retrieval.index": ("retrieval.index.build", "retrieval.index.stage"),
    "retrieval.search": ("retrieval.search", "retrieval.search.job", "retrieval.search.stage"),
    "retrieval.report": ("retrieval.report", "retrieval.report.job", "retrieval.report.stage"),
    "retrieval.train": ("retrieval.train.job", "retrieval.train.trainer", "retrieval.train.stage"),
    "retrieval.evaluate": ("retrieval.evaluate",),
    "retrieval.remove": ("retrieval.remove.job", "retrieval.remove.stage"),
    "retrieval.duplicates": ("retrieval.duplicates.job", "retrieval.duplicates.stage"),
}
RECIPES = "retrieval.recipes"
# the one stage that runs another: search encodes image queries with the extract stage (query role)
# into <output>/query_features (docs/search.md). Anything else that chains stages is a recipe.
STAGE_JOB_ALLOWED = {("retrieval.search.queries", "retrieval.extract.job")}


def _stage_of(module: str) -> str | None:
    return next((p for p in STAGE_PACKAGES if module == p or module.startswith(p + ".")), None)


def stage_job_violations(edges: list[Edge], allowed=frozenset()) -> list[Edge]:
    """Imports by a stage package of another stage's job module, or of a recipe."""
    bad = []
    for e in dict.fromkeys(edges):
        src = _stage_of(e.src)
        if src is None or (e.src, e.dst) in allowed:
            continue
        if e.dst == RECIPES or e.dst.startswith(RECIPES + "."):
            bad.append(e)
        elif (dst := _stage_of(e.dst)) is not None and dst != src and e.dst in JOB_MODULES[dst]:
            bad.append(e)
    return bad


def test_the_stage_rule_catches_a_planted_violation(tmp_path):
    pkg = tmp_path / "retrieval"
    files = {
        "__init__.py": "", "metrics.py": "",
        "extract/__init__.py": "", "extract/job.py": "", "extract/features.py": "",
        "fit/__init__.py": "", "fit/job.py": "from retrieval.extract.features import read_features\n",
        "index/__init__.py": "", "index/build.py": "",
        "search/__init__.py": "from retrieval.search.job import search\n", "search/job.py": "",
        "search/queries.py": "def encode():\n    from retrieval.extract.job import extract\n",
        "report/__init__.py": "", "report/job.py": "from retrieval.search.results import read_results\n",
        "search/results.py": "",
        "train/__init__.py": "", "train/job.py": "", "train/trainer.py": "",
        "train/data.py": "from retrieval.extract import features\n",
        "train/bad.py": "def f():\n    from retrieval.fit import job\n",           # another stage's job
        "evaluate.py": "from retrieval import search\n",                                  # search's package
        "report/uses_recipe.py": "import retrieval.recipes.default_model\n",              # a recipe
        "recipes/__init__.py": "",
        "recipes/default_model.py": "from retrieval.fit.job import fit\nfrom retrieval.train import trainer\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    _, edges = import_edges(str(pkg))
    found = {(e.src, e.dst) for e in stage_job_violations(edges, STAGE_JOB_ALLOWED)}
    assert found == {("retrieval.train.bad", "retrieval.fit.job"), ("retrieval.evaluate", "retrieval.search"),
                     ("retrieval.report.uses_recipe", "retrieval.recipes.default_model")}
    # without the allowance, search's query encoding is reported too
    assert ("retrieval.search.queries", "retrieval.extract.job") in {
        (e.src, e.dst) for e in stage_job_violations(edges)}


def test_stages_never_import_another_stages_job_nor_a_recipe():
    mods, edges = import_edges()
    assert set(JOB_MODULES) == set(STAGE_PACKAGES) and all(m in mods for ms in JOB_MODULES.values() for m in ms)
    assert "retrieval.recipes.default_model" in mods
    bad = stage_job_violations(edges, STAGE_JOB_ALLOWED)
    assert not bad, ("a stage imports another stage's job or a recipe (chain stages in retrieval/recipes/; "
                     "read another stage's output with its reader):\n" + "\n".join(f"  {e}" for e in bad))
    # a recipe chains stages: the default model's recipe runs training, then fit
    pairs = {(e.src, e.dst) for e in edges}
    assert ("retrieval.recipes.default_model", "retrieval.fit.job") in pairs


CORE = ("retrieval.config", "retrieval.stage", "retrieval.fsio", "retrieval.schema", "retrieval.outputs",
        "retrieval.lease", "retrieval.engine", "retrieval.integrity", "retrieval.faults", "retrieval.console",
        "retrieval.progress", "retrieval.metrics")
ABOVE_CORE = ("retrieval.model", "retrieval.extract", "retrieval.fit", "retrieval.index", "retrieval.search",
              "retrieval.evaluate", "retrieval.report", "retrieval.train", "retrieval.plan", "retrieval.export",
              "retrieval.registry", "retrieval.recipes", "retrieval.cli", "retrieval.api")


def core_violations(edges: list[Edge]) -> list[Edge]:
    """Imports by a core module of anything above core (a stage, the model, the registry, a recipe,
    the drivers): the upward arrows issue 21 removed (config importing train.augment)."""
    return [e for e in dict.fromkeys(edges)
            if any(e.src == c or e.src.startswith(c + ".") for c in CORE)
            and any(e.dst == p or e.dst.startswith(p + ".") for p in ABOVE_CORE)]


def test_the_core_rule_catches_a_planted_violation(tmp_path):
    pkg = tmp_path / "retrieval"
    (pkg / "train").mkdir(parents=True)
    for name, text in {"__init__.py": "", "train/__init__.py": "", "train/augment.py": "OPS = ()\n",
                       "config.py": "def check():\n    from retrieval.train.augment import OPS\n",
                       "fsio.py": "import os\n", "registry.py": "from retrieval import config\n"}.items():
        (pkg / name).write_text(text)
    _, edges = import_edges(str(pkg))
    assert {(e.src, e.dst) for e in core_violations(edges)} == {("retrieval.config", "retrieval.train.augment")}


def test_core_imports_nothing_above_it():
    """config, the engine, outputs, ... import no stage, no model, no registry: the stages' config rules
    reach config through config.use_rules, installed by the registry."""
    mods, edges = import_edges()
    assert all(any(m == c or m.startswith(c + ".") for m in mods) for c in CORE)
    bad = core_violations(edges)
    assert not bad, "core imports a layer above it:\n" + "\n".join(f"  {e}" for e in bad)
