"""Small pieces a newcomer can read: no module in retrieval/ over 400 lines, no function over 80
lines. A numba kernel factory may be longer when its first docstring line or a comment on its ``def``
line says ``size-exempt`` and why (one compiled unit cannot be split)."""
from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "retrieval")
MAX_MODULE, MAX_FUNCTION = 400, 80


def _files() -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out)


def too_long(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    lines = text.split("\n")
    problems = []
    if len(lines) > MAX_MODULE:
        problems.append(f"{path}: {len(lines)} lines (> {MAX_MODULE})")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            exempt = "size-exempt" in lines[node.lineno - 1] or "size-exempt" in (ast.get_docstring(node) or "")
            if n > MAX_FUNCTION and not exempt:
                problems.append(f"{path}:{node.lineno}: {node.name} has {n} lines (> {MAX_FUNCTION})")
    return problems


def test_the_checker_sees_a_long_function_and_a_long_module(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION))
    f = tmp_path / "m.py"
    f.write_text(f"def f():\n{body}\n    return 0\n" + "\n" * MAX_MODULE)
    problems = too_long(str(f))
    assert any("f has" in p for p in problems) and any("lines (> 400)" in p for p in problems)
    f.write_text(f"def f():  # size-exempt: one kernel\n{body}\n    return 0\n")
    assert too_long(str(f)) == []


def test_no_module_over_400_lines_and_no_function_over_80():
    problems = [p for path in _files() for p in too_long(path)]
    assert not problems, "\n".join(problems)
