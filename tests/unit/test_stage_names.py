"""One name per stage (issue 14): the CLI subcommand, ``jobs/<stage>.py``, the config section, the
library package or module, the Airflow task ids and the manifest's ``stage`` line up; the old names
are accepted with a deprecation message."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import yaml

from retrieval import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "retrieval")
# stages that have settings of their own (plan reads other sections; export reads model)
CONFIGURED = {"extract", "fit", "index", "search", "evaluate", "report", "train"}
# stages whose output directory carries the marker (fit writes one checkpoint file + its card)
MARKED = {"extract", "index", "search", "evaluate", "report", "train"}


def _subcommands() -> dict[str, str]:
    """subcommand (and alias) -> the name argparse dispatches."""
    sub = next(a for a in cli.build_parser()._actions if a.dest == "stage")
    return {name: p.prog.split()[-1] for name, p in sub.choices.items()}


def test_cli_subcommands_are_the_stages_plus_the_old_names():
    subs = _subcommands()
    assert set(subs) == set(cli.STAGES) | set(cli.ALIASES)
    assert all(cli.ALIASES[old] in cli.STAGES for old in cli.ALIASES)


def test_every_stage_has_its_package_or_module_and_one_entry():
    for stage, module in cli.STAGES.items():
        assert module in (f"retrieval.{stage}", f"retrieval.{stage}.cli"), (stage, module)
        path = os.path.join(ROOT, *module.split(".")) + ".py"
        assert os.path.isfile(path), path
        tree = ast.parse(open(path, encoding="utf-8").read())
        entries = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_cli"]
        assert len(entries) == 1 and [a.arg for a in entries[0].args.args] == ["args", "cfg", "engine"], path
    # no package left under an old name
    for old in ("features", "audit", "training"):
        assert not os.path.exists(os.path.join(PKG, old)), old


def test_every_job_file_is_a_stage_or_an_old_name_and_a_thin_wrapper():
    jobs = {f[:-3] for f in os.listdir(os.path.join(ROOT, "jobs")) if f.endswith(".py")}
    assert jobs == set(cli.STAGES) | set(cli.JOB_ALIASES)
    assert all(cli.JOB_ALIASES[old] in cli.STAGES for old in cli.JOB_ALIASES)
    for name in jobs:
        tree = ast.parse(open(os.path.join(ROOT, "jobs", name + ".py"), encoding="utf-8").read())
        body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body    # after the docstring
        code = ast.unparse(ast.Module(body=body, type_ignores=[]))
        assert code == "from retrieval.cli import run_job\nif __name__ == '__main__':\n    run_job(__file__)", name


def test_config_sections_are_the_configured_stages():
    with open(os.path.join(PKG, "conf", "defaults.yaml"), encoding="utf-8") as fh:
        sections = set(yaml.safe_load(fh))
    assert CONFIGURED <= set(cli.STAGES) and CONFIGURED <= sections
    assert not sections & {"features", "audit", "training", "build_index", "build-index"}
    assert sections - CONFIGURED == {"spark", "io", "model", "preprocess", "faults"}   # not stages


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
        assert stage in cli.STAGES and stage not in cli.JOB_ALIASES, job
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
