"""The package's layers point one way (issue 14): core (config, fsio, schema, ...) -> extract
(retrieval.extract: model, checkpoints, preprocessing, inputs) -> index -> search -> evaluate / report,
and training on top of extract. No import circle inside ``retrieval``.

The import graph is read from the source with :mod:`ast` (nothing is imported): every ``import`` and
``from ... import`` of a ``retrieval`` module, at module level AND inside functions (a lazy import is
still a dependency: it only moves the failure to run time), relative imports resolved, and
``from pkg import submodule`` counted as an import of the submodule.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "retrieval")

# what the feature layer (retrieval.extract) must never import: the layers above it
ABOVE_FEATURES = ("retrieval.train", "retrieval.search", "retrieval.index", "retrieval.report",
                  "retrieval.evaluate")


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
    assert "retrieval.extract.model" in mods and "retrieval.train.trainer" in mods
    assert ("retrieval.extract.job", "retrieval.extract.preprocess") in pairs      # module level
    assert ("retrieval.extract.job", "retrieval.extract.inputs") in pairs          # from pkg import mod
    assert ("retrieval.extract.job", "retrieval.extract.checkpoints") in pairs     # function-local


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


def test_spark_is_imported_by_the_spark_engine_only():
    """pyspark (and the Spark engine's internals, retrieval.sparkutil) are imported by
    retrieval/engine.py and retrieval/sparkutil.py only: every stage runs on an engine."""
    allowed = {os.path.join(ROOT, "engine.py"), os.path.join(ROOT, "sparkutil.py")}
    offenders = []
    for name, path in _modules().items():
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}:{node.lineno} imports {n}" for n in names
                          if n == "pyspark" or n.startswith(("pyspark.", "retrieval.sparkutil"))]
    assert not offenders, offenders


# the stages, and each stage's job: the module holding its stage function, its CLI adapter and a
# package __init__ that re-exports the stage function. Readers of a stage's output live apart from
# its job (retrieval.extract.features, retrieval.search.results, retrieval.metrics) so that the next
# stage imports them, never the job.
STAGE_PACKAGES = ("retrieval.extract", "retrieval.fit", "retrieval.index", "retrieval.search",
                  "retrieval.report", "retrieval.train", "retrieval.evaluate")
JOB_MODULES = {
    "retrieval.extract": ("retrieval.extract.job", "retrieval.extract.cli"),
    "retrieval.fit": ("retrieval.fit.job", "retrieval.fit.cli"),
    "retrieval.index": ("retrieval.index.build", "retrieval.index.cli"),
    "retrieval.search": ("retrieval.search", "retrieval.search.job", "retrieval.search.cli"),
    "retrieval.report": ("retrieval.report", "retrieval.report.job", "retrieval.report.cli"),
    "retrieval.train": ("retrieval.train.job", "retrieval.train.trainer", "retrieval.train.cli"),
    "retrieval.evaluate": ("retrieval.evaluate",),
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
