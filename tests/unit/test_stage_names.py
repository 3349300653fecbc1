"""One name per stage, read from the stage registry: the CLI subcommand, ``jobs/<stage>.py`` (generated
from the registry), the config section, the library package or module, the README's stage table, the
Airflow task ids and the manifest's ``stage`` line up; the old names are accepted with a deprecation
message."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import yaml

from retrieval import cli, config, registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "retrieval")
# stages that have settings of their own (plan reads other sections; export reads model)
CONFIGURED = {"extract", "fit", "index", "search", "evaluate", "report", "train"}
# stages whose output directory carries the marker (fit writes one checkpoint file + its card)
MARKED = {"run", "extract", "index", "search", "evaluate", "report", "train"}


STAGES = registry.stages()
ALIASES = {old: st.name for st in STAGES.values() for old in st.aliases}
JOB_ALIASES = {old: st.name for st in STAGES.values() for old in st.job_aliases}


def _subcommands() -> dict[str, str]:
    """subcommand (and alias) -> the name argparse dispatches."""
    sub = next(a for a in cli.build_parser()._actions if a.dest == "stage")
    return {name: p.prog.split()[-1] for name, p in sub.choices.items()}


def test_cli_subcommands_are_the_registered_stages_plus_the_old_names():
    subs = _subcommands()
    assert set(subs) == set(STAGES) | set(ALIASES)
    assert list(STAGES)[:5] == ["run", "extract", "fit", "index", "search"]


def test_every_stage_is_declared_by_its_own_package_or_module():
    for module, (name, stage) in zip(registry.STAGE_MODULES, STAGES.items()):
        assert module in (f"retrieval.{name}", f"retrieval.{name}.stage", f"retrieval.recipes.{name}"), (name, module)
        assert stage.section in (None, name), (name, stage.section)
        assert "output" in {a.dest for a in stage.args} or not stage.writes, name
    # no package left under an old name, no leftover CLI adapter modules
    for old in ("features", "audit", "training"):
        assert not os.path.exists(os.path.join(PKG, old)), old
    for name in STAGES:
        assert not os.path.exists(os.path.join(PKG, name, "cli.py")), name


def test_every_job_file_is_generated_from_the_registry():
    jobs = {f[:-3] for f in os.listdir(os.path.join(ROOT, "jobs")) if f.endswith(".py")}
    assert jobs == set(STAGES) | set(JOB_ALIASES)
    for name in jobs:
        with open(os.path.join(ROOT, "jobs", name + ".py"), encoding="utf-8") as fh:
            text = fh.read()
        assert text == registry.job_file_text(registry.get(name), name), (
            f"jobs/{name}.py differs from the registry: python -m retrieval.registry --write-jobs")
        tree = ast.parse(text)     # and it is the thin wrapper
        body = ast.unparse(ast.Module(body=tree.body[1:], type_ignores=[]))
        assert body == "from retrieval.cli import run_job\nif __name__ == '__main__':\n    run_job(__file__)", name


def test_config_sections_are_the_stages_sections_plus_the_shared_ones():
    with open(os.path.join(PKG, "conf", "defaults.yaml"), encoding="utf-8") as fh:
        sections = set(yaml.safe_load(fh))
    owned = {st.section for st in STAGES.values() if st.section}
    assert owned == CONFIGURED and owned <= sections
    assert not sections & {"features", "audit", "training", "build_index", "build-index"}
    assert sections - owned == set(registry.SHARED_SECTIONS)   # not stages


def test_every_check_belongs_to_a_key_of_its_stages_section():
    defaults = config.defaults()
    for stage in STAGES.values():
        for key in stage.checks:
            node = defaults
            for part in key.split("."):
                assert part in node, (stage.name, key)
                node = node[part]
    for key in config.CHECKS:
        assert key.split(".")[0] in registry.SHARED_SECTIONS, key


def test_the_readme_stage_table_is_the_registrys():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert registry.stage_table() in readme, "README's stage table: python -m retrieval.registry --table"


def test_dag_task_ids_are_stage_names():
    """The DAG's Spark tasks are the rows of its STAGES table (task id -> job file, arguments)."""
    tree = ast.parse(open(os.path.join(ROOT, "jobs", "dags", "retrieval_daily.py"), encoding="utf-8").read())
    tables = [n.value for n in ast.walk(tree)
              if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "STAGES"
              or isinstance(n, ast.Assign) and "STAGES" in [getattr(t, "id", None) for t in n.targets]]
    assert len(tables) == 1 and isinstance(tables[0], ast.Dict), "one STAGES = {...} table in the DAG"
    rows = {k.value: {rk.value: rv for rk, rv in zip(v.keys, v.values)}
            for k, v in zip(tables[0].keys, tables[0].values)}
    assert len(rows) >= 7
    # every Spark task of the DAG is built from its row (spark_job / stage_kwargs take the task id)
    built = {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) in ("spark_job", "stage_kwargs") and isinstance(n.args[0], ast.Constant)}
    assert built == set(rows)
    seen = set()
    for task_id, row in rows.items():
        job = row["job"].value
        stage = job[:-3]
        assert stage in STAGES and stage not in JOB_ALIASES, job
        assert task_id == stage or task_id.startswith(stage + "_"), (task_id, job)
        seen.add(stage)
    assert seen == {"fit", "extract", "index", "search", "report"}


def test_manifests_name_their_stage():
    """Every ``outputs.commit(url, "<stage>", ...)`` in the library names a stage, and every stage
    with an output directory commits one."""
    committed = set()
    for dirpath, _, files in os.walk(PKG):
        for fn in files:
            if fn.endswith(".py"):
                tree = ast.parse(open(os.path.join(dirpath, fn), encoding="utf-8").read())
                for n in ast.walk(tree):
                    if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "commit" \
                            and getattr(n.func.value, "id", None) == "outputs":
                        committed.add(n.args[1].value)
    assert committed == MARKED
    assert MARKED | {"fit", "export"} == {n for n, st in STAGES.items() if st.writes}


def test_old_subcommand_is_accepted_with_a_deprecation_message(tmp_path, capsys):
    rc = cli.main(["build-index", "--features", str(tmp_path / "missing"), "--output", str(tmp_path / "x"),
                   "--engine", "local"])
    err = capsys.readouterr().err
    assert "retrieval build-index is deprecated" in err and "use retrieval index" in err
    assert rc == 2 and "retrieval index: error:" in err and "_manifest.json" in err   # ran as `index`


def test_old_job_file_is_accepted_with_a_deprecation_message(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "audit_report.py"), "--results",
                           str(tmp_path / "missing"), "--output", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert "jobs/audit_report.py is deprecated" in proc.stderr and "use jobs/report.py" in proc.stderr
    assert proc.returncode == 2 and "retrieval report: error:" in proc.stderr, proc.stderr


def test_one_version_everywhere(capsys):
    """setup.py, retrieval.__version__, `retrieval --version` and the CHANGELOG's newest entry agree."""
    import re

    import retrieval

    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as fh:
        assert f'version="{retrieval.__version__}"' in fh.read()
    try:
        cli.main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert capsys.readouterr().out.strip() == f"retrieval {retrieval.__version__}"
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as fh:
        # the newest released entry (an "Unreleased" section above it gathers the changes to come)
        assert re.search(r"^## (?!Unreleased)(\S+)", fh.read(), re.M).group(1) == retrieval.__version__


def _dag_stage_args() -> dict[str, tuple[str, list[str], list[str]]]:
    """task id -> (job file, the option flags its arguments name, the config keys its --set's name),
    read from the DAG's STAGES table with ast (the DAG runs in Airflow's environment, not this one)."""
    with open(os.path.join(ROOT, "jobs", "dags", "retrieval_daily.py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    names = {t.id: n.value for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
             for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}

    def tokens(node) -> tuple[list[str], list[str]]:
        flags, keys = [], []
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            flags += [w.split("=")[0] for w in node.value.split() if w.startswith("--")]
        elif isinstance(node, (ast.List, ast.Tuple)):
            for el in node.elts:
                f, k = tokens(el)
                flags, keys = flags + f, keys + k
        elif isinstance(node, ast.Starred):
            return tokens(node.value)
        elif isinstance(node, ast.Name) and node.id in names:
            return tokens(names[node.id])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "set_when":
            flags.append("--set")
            keys.append(node.args[0].value)
        return flags, keys

    table = names["STAGES"]
    out = {}
    for key, entry in zip(table.keys, table.values):
        fields = dict(zip((k.value for k in entry.keys), entry.values))
        flags, keys = tokens(fields["args"])
        common, _ = tokens(names["COMMON_ARGS"])
        out[key.value] = (fields["job"].value, flags + common, keys)
    return out


def test_the_dags_stage_arguments_are_the_registrys():
    """Every Spark task of the DAG runs a registered stage's job file with options that stage has,
    its required options given (the gallery drops' --features arrive at run time from XCom), and
    every --set key it templates is a real config key."""
    dag = _dag_stage_args()
    assert {"fit", "extract_gallery", "index", "index_append", "extract_queries", "search", "report"} <= set(dag)
    sub = next(a for a in cli.build_parser()._actions if a.dest == "stage")
    for task_id, (job, flags, keys) in dag.items():
        stage = registry.get(job[:-3])
        assert stage.name == job[:-3] and (task_id == stage.name or task_id.startswith(stage.name + "_")), task_id
        parser = sub.choices[stage.name]
        options = {o for a in parser._actions for o in a.option_strings}
        assert set(flags) <= options, (task_id, sorted(set(flags) - options))
        required = {a.option_strings[0] for a in parser._actions if a.required}
        given = set(flags) | ({"--features"} if stage.name == "index" else set())
        assert required <= given, (task_id, sorted(required - given))
        for key in keys:
            registry.load_config(sets=[f"{key}=null"] if key == "model.checkpoint" else [])[key]   # exists
