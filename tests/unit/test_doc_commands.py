"""Every ``retrieval ...`` command line in the README and docs/ parses with the CLI's real arguments
(the subcommand exists, every option is one of its options, required options are there), so the
docs cannot drift from the command line; and the demo's figures are not hard-coded in the README."""
from __future__ import annotations

import glob
import os
import re
import shlex

import pytest

from retrieval import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
STAGE_WORDS = None


def _stage_words() -> set[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "stage")
    return set(sub.choices)


def _candidates(text: str) -> list[tuple[int, str]]:
    """(line number, command) of each `retrieval <word> ...` in code: fenced blocks (with backslash
    continuations) and inline `...` spans."""
    found = []
    lines = text.split("\n")
    fenced = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            fenced = not fenced
            i += 1
            continue
        if fenced:
            start = i
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            line = re.split(r"(?:^|\s)#", line)[0]           # not in a comment
            for m in re.finditer(r"(?:^|[\s;&|(/])(retrieval\s+[a-z][\w-]*(?=\s|$)(?:\s[^#;&|]*)?)", line):
                found.append((start + 1, m.group(1)))
        else:
            for span in re.findall(r"`([^`]+)`", line):     # an inline command: one with an option
                if re.match(r"retrieval\s+[a-z][\w-]*\s.*--[a-z]", span):
                    found.append((-(i + 1), span))     # negative: a mention in prose
        i += 1
    return found


def _normalise(command: str) -> list[str] | None:
    """The argument list to parse, or None when the text is not a command line (prose)."""
    while True:                                                  # [--optional parts] are taken in
        stripped = re.sub(r"\[([^\[\]]*)\]", r"\1", command)
        if stripped == command:
            break
        command = stripped
    command = command.replace("...", "X")
    command = re.sub(r"(\S+)\|(\S+)", r"\1", command)           # a|b alternatives: the first
    command = re.sub(r"\$\(?\{?[\w\[\]@]+\}?\)?", "X", command)  # shell variables
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    return words[1:]


def _commands() -> list[tuple[str, int, list[str]]]:
    out = []
    stages = _stage_words()
    for path in DOCS:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        for lineno, command in _candidates(text):
            words = _normalise(command)
            if words and words[0] in stages:
                out.append((os.path.relpath(path, ROOT), lineno, words))
    return out


def test_the_docs_have_command_lines_to_check():
    commands = _commands()
    assert len(commands) >= 20 and {w[0] for _, _, w in commands} >= {"run", "extract", "index", "search", "report"}


def _options(stage: str) -> set[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "stage")
    return {o for a in sub.choices[stage]._actions for o in a.option_strings}


@pytest.mark.parametrize("where, lineno, words", _commands(),
                         ids=lambda v: str(v) if isinstance(v, (str, int)) else " ".join(v)[:60])
def test_every_documented_command_line_parses(where, lineno, words, capsys):
    """A command in a code block parses as a whole; one mentioned in prose names only real options."""
    if lineno < 0:
        unknown = [w.split("=")[0] for w in words[1:] if w.startswith("--") and w.split("=")[0] not in _options(words[0])]
        assert not unknown, f"{where}:{-lineno}: `retrieval {' '.join(words)}`: no such option {unknown}"
        return
    parser = cli.build_parser()
    try:
        parser.parse_args(words)
    except SystemExit as exc:
        pytest.fail(f"{where}:{lineno}: `retrieval {' '.join(words)}` does not parse: "
                    f"{capsys.readouterr().err.strip().splitlines()[-1]} (exit {exc.code})")


def test_the_readme_has_no_hard_coded_demo_figures():
    """The demo prints its own figures; the README says what it prints, not numbers that drift."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    demo = readme.split("## ", 2)[1]     # the quick start section
    assert not re.search(r"recall@1 \d|µAP \d|micro-AP \d|\d+ matches flagged", demo), demo


def test_every_file_the_docs_name_exists():
    """A path to a module, test or script named in the README or docs/ exists (renames update docs)."""
    missing = []
    for path in DOCS:
        with open(path, encoding="utf-8") as fh:
            for name in sorted(set(re.findall(r"(?<![\w/])((?:retrieval|tests|scripts|jobs)/[\w/]+\.(?:py|sh|yaml|md))", fh.read()))):
                if not os.path.exists(os.path.join(ROOT, name)) and "thumbs" not in name:   # the worked example
                    missing.append(f"{os.path.relpath(path, ROOT)}: {name}")
    assert not missing, missing
