"""What a stage is: one object per stage, declared by the stage's own package and listed in
:mod:`retrieval.registry`.

A :class:`Stage` holds everything the command line, the ``jobs/<stage>.py`` entry points, the
configuration's validation, the docs' stage table and the stage-name tests need to know of a
stage: its name and one-line help, its command-line arguments, the config section it owns (with
the value checks of its keys), how its settings are built from the configuration, and
``run(inputs, output, settings, engine) -> manifest``. The stage's package declares it as
``STAGE`` in ``retrieval/<stage>/stage.py`` (or in the stage's module); adding a stage is that
package plus one line in :data:`retrieval.registry.STAGE_MODULES`.

This module is core: it imports nothing of the stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# a config key's value check: None when the value is fine, else what is wrong with it
Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Arg:
    """One command-line argument of a stage: ``flags`` and ``argparse`` options as
    ``add_argument`` takes them. ``config_key``: the argument sets this config key (``--role`` sets
    ``extract.role``) instead of reaching ``run`` as an input."""

    flags: tuple[str, ...]
    options: Mapping[str, Any]
    config_key: str | None = None

    @property
    def dest(self) -> str:
        if "dest" in self.options:
            return str(self.options["dest"])
        long = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        return long.lstrip("-").replace("-", "_")


def arg(*flags: str, config_key: str | None = None, **options: Any) -> Arg:
    """``arg("--input", required=True, help=...)``: an :class:`Arg`."""
    return Arg(tuple(flags), options, config_key)


def _the_config(cfg: Any) -> Any:
    return cfg


def _no_summary(manifest: Any, inputs: Mapping[str, Any], output: str | None) -> Any:
    return manifest


@dataclass(frozen=True)
class Stage:
    """A pipeline stage (see the module doc).

    - ``run(inputs, output, settings, engine)``: does the work and returns the output's manifest
      (``None`` for a stage that writes nothing, such as ``plan``). ``inputs``: the stage's
      command-line arguments other than ``--output`` and the common options, by ``dest``.
    - ``settings(cfg)``: the settings ``run`` takes, built from the validated configuration
      (default: the configuration itself).
    - ``summary(manifest, inputs, output)``: what the command prints (as JSON) when the run ends.
    - ``section``: the config section the stage owns (its keys' defaults are in
      ``retrieval/conf/defaults.yaml``, or in ``defaults`` for a stage that brings its own section);
      ``checks``: value checks by full key (``"extract.batch_size"``); ``nullable``: the type a
      non-null value must have, for keys whose default is null.
    - ``engine``: the default of ``--engine`` (``"spark"`` or ``"local"``), or None for a stage
      that runs on no engine (no ``--engine`` / ``--master`` options).
    - ``writes``: the stage writes an output (``--overwrite`` applies to it).
    - ``aliases`` / ``job_aliases``: names before 0.2, accepted with a deprecation message until
      0.3 (subcommands / ``jobs/<name>.py`` files).
    """

    name: str
    help: str
    run: Callable[[Mapping[str, Any], "str | None", Any, Any], Any]
    args: tuple[Arg, ...] = ()
    settings: Callable[[Any], Any] = _the_config
    summary: Callable[[Any, Mapping[str, Any], "str | None"], Any] = _no_summary
    section: str | None = None
    checks: Mapping[str, Check] = field(default_factory=dict)
    nullable: Mapping[str, type] = field(default_factory=dict)
    defaults: Mapping[str, Any] | None = None
    engine: str | None = "spark"
    writes: bool = True
    aliases: tuple[str, ...] = ()
    job_aliases: tuple[str, ...] = ()
    usage: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"stage name {self.name!r}: one lower-case word (it names a module and a job file)")
        if self.engine not in (None, "spark", "local"):
            raise ValueError(f"stage {self.name}: engine must be 'spark', 'local' or None, got {self.engine!r}")
        for key in (*self.checks, *self.nullable):
            if self.section is None or not key.startswith(self.section + "."):
                raise ValueError(f"stage {self.name}: check for {key!r} outside its section {self.section!r}")
        if self.defaults is not None and self.section is None:
            raise ValueError(f"stage {self.name}: defaults without a section")


# ---------------------------------------------------------------------------------------------
# value checks the stages' ``checks`` are made of
def choice(*options: Any) -> Check:
    """The value is one of ``options``."""
    return lambda v: None if v in options else f"must be one of {', '.join(map(str, options))}"


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def positive_or_auto(v: Any) -> str | None:
    """``auto`` (choose for me) or a number > 0."""
    return None if v == "auto" or (not isinstance(v, str) and v > 0) else "must be 'auto' or > 0"


def whole_or_auto(v: Any) -> str | None:
    """``auto`` (choose for me) or a whole number >= 0."""
    return None if v == "auto" or (not isinstance(v, str) and v >= 0 and v == int(v)) \
        else "must be 'auto' or a whole number >= 0"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def number(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) else "must be a number"


def between(low: float, high: float) -> Check:
    """``low <= value <= high``."""
    return lambda v: None if low <= v <= high else f"must be in [{low:g}, {high:g}]"


def ascending_scores(v: Any) -> str | None:
    """A strictly ascending list of scores in [-1, 1] (report bands)."""
    return None if all(isinstance(b, (int, float)) and not isinstance(b, bool) and -1.0 <= b <= 1.0
                       for b in v) and list(v) == sorted(set(v)) \
        else "must be a strictly ascending list of numbers in [-1, 1]"
