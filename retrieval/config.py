"""Configuration: embedded YAML defaults + overlays + ``--set key=value`` overrides, validated.

Every key that exists is in ``retrieval/conf/defaults.yaml`` (or, for a stage that brings its own
section, in its :class:`~retrieval.stage.Stage`'s ``defaults``). An overlay may only change existing
keys; values keep the type of the default (``null`` defaults are typed in ``NULLABLE``). The value
rules: ``CHECKS`` here for the sections no stage owns, and each stage's ``checks``, which the stage
registry (:mod:`retrieval.registry`, imported with the package) provides as :class:`Rules` through
:func:`use_rules`: this core module reads the registry without importing it. Any violation raises :class:`ConfigError` naming the key and the value, before any
work starts.
"""
from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Iterable, Mapping

import yaml

from retrieval import fsio
from retrieval.stage import Check, choice, non_negative, positive


class ConfigError(ValueError):
    """A configuration file or override is invalid (the message names the key)."""


# keys whose default is null: the type a non-null value must have
NULLABLE: dict[str, type] = {
    "model.checkpoint": str,
    "model.onnx_file": str,
    "train.eval_input": str,
    "train.teacher": str,
    "search.coarse_threshold": float,
    "search.match_threshold": float,
    "search.normalize.background": str,
    "fit.background": str,
}

# "choose for me" is spelled `auto` in every key. These keys spelled it 0 or null before 0.2: the old
# spelling is still accepted (read as auto) with a deprecation warning until 0.3. A key's other values:
# a positive int, or (the two column keys) a column name.
AUTO_OLD_SPELLING: dict[str, Any] = {
    "extract.threads": 0, "index.threads": 0, "search.threads": 0, "fit.threads": 0, "train.threads": 0,
    "index.nlist": 0, "index.nprobe": 0, "search.nprobe": 0, "search.shortlist": 0,
    "search.shard_shortlist": 0, "extract.key_column": None, "extract.bytes_column": None,
}

# keys that take either a number or the word "auto"
NUMBER_OR_AUTO = {"fit.shrinkage", "report.threshold", "extract.decode_threads", "duplicates.slice_images",
                  "search.geometric.top"}

# keys that take either a number or a mapping with these keys (and their types)
NUMBER_OR_MAPPING: dict[str, dict[str, type]] = {
    "report.threshold": {"from_evaluation": str, "precision": float},
}

# keys that hold free-form mappings (any sub-keys allowed); spark.conf values become strings
FREE_MAPPINGS = {"spark.conf", "io.storage_options"}


# value rules of the sections no stage owns (io, model, preprocess); each stage declares the rules
# of its own section (retrieval/stage.py, collected by retrieval.registry.load_config)
CHECKS: dict[str, Check] = {
    "io.lease_seconds": positive,
    "model.backbone": choice("mobilenet_v2", "resnet18", "resnet50", "torchscript", "onnx"),
    "model.input_layout": choice("auto", "float_nchw", "uint8_nhwc"),
    "model.device": choice("auto", "cpu", "cuda"),
    "model.runtime": choice("auto", "torch", "onnx"),
    "model.precision": choice("fp32", "fp16", "bf16"),
    "model.fine_dim": positive,
    "model.coarse_dim": positive,
    "model.gem_p": positive,
    "preprocess.size_hi": lambda v: None if 32 <= v <= 4096 else "must be in [32, 4096]",
    "preprocess.size_lo": lambda v: None if 32 <= v <= 4096 else "must be in [32, 4096]",
    "preprocess.resize": choice("squash", "letterbox"),
    "preprocess.decoder": choice("fast", "pillow"),
    "preprocess.max_bytes": positive,
    "preprocess.max_pixels": positive,
    "preprocess.min_side": positive,
    "preprocess.max_aspect": lambda v: None if v >= 1 else "must be >= 1",
}


@dataclass(frozen=True)
class Rules:
    """What the stages add to the configuration: value checks by key, the types of null-default keys,
    and the defaults of sections that are not in ``defaults.yaml``."""

    checks: Mapping[str, Check] = field(default_factory=dict)
    nullable: Mapping[str, type] = field(default_factory=dict)
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


CORE = Rules()

# where the stages' rules come from: retrieval.registry installs itself here when it is imported
# (retrieval/__init__.py imports it), so this core module reads the registry without importing it
_RULES_SOURCE: list[Callable[[], Rules]] = []


def use_rules(source: Callable[[], Rules]) -> None:
    """Install the function that returns the stages' :class:`Rules` (the registry's)."""
    _RULES_SOURCE[:] = [source]


def _resolve(rules: Rules | None) -> Rules:
    if rules is not None:
        return rules
    return _RULES_SOURCE[0]() if _RULES_SOURCE else CORE


@functools.lru_cache(maxsize=1)
def _defaults_text() -> str:
    return resources.files("retrieval.conf").joinpath("defaults.yaml").read_text()


def defaults(rules: Rules | None = None) -> dict:
    """The embedded defaults (plus the sections the stages bring), as a fresh nested dict."""
    data = yaml.safe_load(_defaults_text())
    for section, values in _resolve(rules).sections.items():
        if section in data:
            raise ConfigError(f"config section {section!r} is declared twice (defaults.yaml and a stage)")
        data[section] = copy.deepcopy(dict(values))
    return data


class Config(Mapping[str, Any]):
    """Read-only nested configuration with dotted access: ``cfg["extract.batch_size"]``
    or ``cfg.extract.batch_size``."""

    def __init__(self, data: dict, _prefix: str = "", rules: Rules = CORE) -> None:
        self._data = data
        self._prefix = _prefix
        self._rules = rules

    def __getitem__(self, key: str) -> Any:
        node: Any = self._data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"no config key {self._prefix + key!r}")
            node = node[part]
        full = self._prefix + key
        if isinstance(node, dict) and full not in FREE_MAPPINGS and full not in NUMBER_OR_MAPPING:
            return Config(node, self._prefix + key + ".", self._rules)
        return copy.deepcopy(node) if isinstance(node, (dict, list)) else node

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(str(exc)) from None

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_dict(self) -> dict:
        return copy.deepcopy(self._data)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Config":
        data = self.to_dict()
        for key, value in overrides.items():
            _set(data, key, value, source="override", rules=self._rules)
        validate(data, self._rules)
        return Config(data, rules=self._rules)


def _flatten(d: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        key = prefix + str(k)
        if isinstance(v, Mapping) and key not in FREE_MAPPINGS and key not in NUMBER_OR_MAPPING:
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _default_of(key: str, base: dict) -> Any:
    node: Any = base
    for part in key.split("."):
        node = node[part]
    return node


def _coerce_auto(key: str, value: Any, source: str) -> Any:
    """A key of :data:`AUTO_OLD_SPELLING`: ``auto`` (also for the old spelling, with a warning), an
    int, or (a column key) a string."""
    old = AUTO_OLD_SPELLING[key]
    if value == "auto":
        return value
    if value is old or (old == 0 and isinstance(value, int) and not isinstance(value, bool) and value == 0):
        warnings.warn(f"{source}: config key {key!r} = {value!r} is deprecated and will be removed in 0.3: "
                      f"use {key}: auto", FutureWarning, stacklevel=4)
        return "auto"
    want = str if old is None else int
    if not isinstance(value, want) or isinstance(value, bool):
        raise ConfigError(f"{source}: config key {key!r} must be 'auto' or {want.__name__}, got {value!r}")
    return value


def _coerce(key: str, value: Any, default: Any, source: str, rules: Rules = CORE) -> Any:
    if key in AUTO_OLD_SPELLING:
        return _coerce_auto(key, value, source)
    nullable = {**NULLABLE, **rules.nullable}
    if value is None:
        if default is None or key in nullable:
            return None
        raise ConfigError(f"{source}: config key {key!r} must not be null")
    want: type = nullable.get(key, type(default)) if default is None else type(default)
    if key in NUMBER_OR_AUTO and not (key in NUMBER_OR_MAPPING and isinstance(value, Mapping)):
        if value == "auto":
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        extra = f" or a mapping with keys {', '.join(NUMBER_OR_MAPPING[key])}" if key in NUMBER_OR_MAPPING else ""
        raise ConfigError(f"{source}: config key {key!r} must be a number, 'auto'{extra}; got {value!r}")
    if key in NUMBER_OR_MAPPING and isinstance(value, Mapping):
        allowed = NUMBER_OR_MAPPING[key]
        unknown = set(value) - set(allowed)
        if unknown or not value:
            raise ConfigError(f"{source}: config key {key!r} takes a number or a mapping with keys "
                              f"{', '.join(allowed)}; got {value!r}")
        out = {}
        for sub, v in value.items():
            if allowed[sub] is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, allowed[sub]) or isinstance(v, bool):
                raise ConfigError(f"{source}: config key {key}.{sub} must be {allowed[sub].__name__}, got {v!r}")
            out[sub] = v
        return out
    if key in FREE_MAPPINGS:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: config key {key!r} must be a mapping, got {value!r}")
        if key == "spark.conf":
            return {str(k): str(v) for k, v in value.items()}
        if not all(isinstance(v, Mapping) for v in value.values()):
            raise ConfigError(f"{source}: config key {key!r} must map a protocol to its options, "
                              f"e.g. {{s3: {{endpoint_url: ...}}}}; got {value!r}")
        return copy.deepcopy(dict(value))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is bool or isinstance(value, bool):
        if isinstance(value, bool) and want is bool:
            return value
        raise ConfigError(f"{source}: config key {key!r} must be {want.__name__}, got {value!r}")
    if not isinstance(value, want):
        raise ConfigError(f"{source}: config key {key!r} must be {want.__name__}, got {value!r}")
    return value


def _set(data: dict, key: str, value: Any, source: str, rules: Rules = CORE) -> None:
    base = defaults(rules)
    try:
        default = _default_of(key, base)
    except (KeyError, TypeError):
        hint = ("; fault injection is no longer configured: it is a test hook, the environment variable "
                "RETRIEVAL_FAULTS (docs/reliability.md)") if key.split(".")[0] == "faults" else ""
        raise ConfigError(f"{source}: unknown config key {key!r}{hint}") from None
    if isinstance(default, dict) and key not in FREE_MAPPINGS:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: config key {key!r} is a section, got {value!r}")
        for sub, v in value.items():
            _set(data, f"{key}.{sub}", v, source, rules)
        return
    value = _coerce(key, value, default, source, rules)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if key in FREE_MAPPINGS:
        node.setdefault(parts[-1], {}).update(value)
    else:
        node[parts[-1]] = value


def validate(data: Mapping, rules: Rules = CORE) -> None:
    """Every value against its rule (``CHECKS`` and the stages' ``rules.checks``)."""
    checks = {**CHECKS, **rules.checks}
    for key, value in _flatten(data):
        check = checks.get(key)
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"config key {key!r} = {value!r}: {problem}")
    if data["preprocess"]["size_lo"] > data["preprocess"]["size_hi"]:
        raise ConfigError(
            f"config key 'preprocess.size_lo' = {data['preprocess']['size_lo']!r}: "
            f"must be <= preprocess.size_hi ({data['preprocess']['size_hi']})")


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``extract.num_shards=4``, ``model.checkpoint=null``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from None
    return key.strip(), value


def load(conf_files: Iterable[str] = (), sets: Iterable[str] = (),
         overrides: Mapping[str, Any] | None = None, rules: Rules | None = None) -> Config:
    """Defaults, then each overlay file (any fsspec URL) in order, then ``--set`` items, then
    ``overrides`` (already-typed values from CLI flags), validated with ``CHECKS`` and the stages'
    rules (``rules``, default: the registry's)."""
    rules = _resolve(rules)
    data = defaults(rules)
    for url in conf_files:
        try:
            text = fsio.read_text(url)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {url}") from None
        try:
            overlay = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {url}: not valid YAML: {exc}") from None
        if not isinstance(overlay, Mapping):
            raise ConfigError(f"config file {url}: top level must be a mapping of sections")
        for key, value in overlay.items():
            _set(data, str(key), value, source=url, rules=rules)
    for item in sets:
        key, value = parse_set(item)
        _set(data, key, value, source=f"--set {item}", rules=rules)
    for key, value in (overrides or {}).items():
        _set(data, key, value, source=f"--{key.split('.')[-1]}", rules=rules)
    validate(data, rules)
    return Config(data, rules=rules)
