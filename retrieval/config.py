"""Configuration: embedded YAML defaults + overlays + ``--set key=value`` overrides, validated.

Every key that exists is in ``retrieval/conf/defaults.yaml``. An overlay may only change
existing keys; values keep the type of the default (``null`` defaults are typed in
``NULLABLE``); ``CHECKS`` holds the value rules. Any violation raises :class:`ConfigError`
naming the key and the value, before any work starts.
"""
from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from typing import Any, Callable, Iterable, Mapping

import yaml

from retrieval import fsio


class ConfigError(ValueError):
    """A configuration file or override is invalid (the message names the key)."""


# keys whose default is null: the type a non-null value must have
NULLABLE: dict[str, type] = {
    "model.checkpoint": str,
    "model.onnx_file": str,
    "extract.key_column": str,
    "extract.bytes_column": str,
    "train.eval_input": str,
    "train.teacher": str,
    "search.coarse_threshold": float,
    "search.match_threshold": float,
    "search.normalize.background": str,
}

# keys that take either a number or the word "auto"
NUMBER_OR_AUTO = {"fit.shrinkage"}

# keys that take either a number or a mapping with these keys (and their types)
NUMBER_OR_MAPPING: dict[str, dict[str, type]] = {
    "report.threshold": {"from_evaluation": str, "precision": float},
}

# keys that hold free-form mappings (any sub-keys allowed); spark.conf values become strings
FREE_MAPPINGS = {"spark.conf", "io.storage_options"}


def _augmentations(v) -> str | None:
    from retrieval.train.augment import OPS   # the one list of the augmentations' names

    unknown = sorted(set(v) - set(OPS))
    return f"unknown augmentation(s) {unknown}; choose from {', '.join(OPS)}" if unknown else None


def _choice(*options: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _ascending_scores(v: Any) -> str | None:
    return None if all(isinstance(b, (int, float)) and not isinstance(b, bool) and -1.0 <= b <= 1.0
                       for b in v) and list(v) == sorted(set(v)) \
        else "must be a strictly ascending list of numbers in [-1, 1]"


CHECKS: dict[str, Callable[[Any], str | None]] = {
    "io.lease_seconds": _positive,
    "model.backbone": _choice("mobilenet_v2", "resnet18", "resnet50", "torchscript", "onnx"),
    "model.input_layout": _choice("auto", "float_nchw", "uint8_nhwc"),
    "model.device": _choice("auto", "cpu", "cuda"),
    "model.runtime": _choice("torch", "onnx"),
    "model.fine_dim": _positive,
    "model.coarse_dim": _positive,
    "model.gem_p": _positive,
    "preprocess.size_hi": lambda v: None if 32 <= v <= 4096 else "must be in [32, 4096]",
    "preprocess.size_lo": lambda v: None if 32 <= v <= 4096 else "must be in [32, 4096]",
    "preprocess.resize": _choice("squash", "letterbox"),
    "preprocess.max_bytes": _positive,
    "preprocess.max_pixels": _positive,
    "preprocess.min_side": _positive,
    "preprocess.max_aspect": lambda v: None if v >= 1 else "must be >= 1",
    "extract.role": _choice("gallery", "query"),
    "extract.input_format": _choice("auto", "dir", "manifest", "parquet"),
    "extract.num_shards": lambda v: None if 1 <= v <= 99999 else "must be in [1, 99999]",
    "extract.batch_size": _positive,
    "extract.storage": _choice("float32", "int8"),
    "extract.mode": _choice("incremental", "overwrite"),
    "extract.threads": _non_negative,
    "extract.row_group_size": _positive,
    "extract.progress_seconds": _positive,
    "index.index_key": lambda v: None if v.strip() else "must be 'auto' or a faiss factory string",
    "index.bytes_per_vector": _positive,
    "index.max_pq_bytes": _positive,
    "index.nlist": _non_negative,
    "index.train_points_per_centroid": _positive,
    "index.max_train_points": _positive,
    "index.kmeans": _choice("auto", "flat", "two_level"),
    "index.kmeans_iters": _positive,
    "index.vectors_per_shard": _positive,
    "index.nprobe": _non_negative,
    "index.max_nprobe": _positive,
    "index.target_recall": lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    "index.quality_queries": _non_negative,
    "index.quality_noise": _non_negative,
    "index.tune_noise": _non_negative,
    "index.tune_queries": _non_negative,
    "index.duplicates": _choice("skip", "error", "keep"),
    "index.dedup_on_driver_max": _non_negative,
    "index.mode": _choice("incremental", "overwrite"),
    "index.batch_rows": _positive,
    "index.threads": _non_negative,
    "index.seed": _non_negative,
    "index.progress_seconds": _positive,
    "faults.stage": _choice("", "extract", "index", "search"),
    "faults.kind": _choice("raise", "kill"),
    "faults.after_items": _non_negative,
    "search.shortlist": _non_negative,
    "search.shard_shortlist": _non_negative,
    "search.k": _positive,
    "search.nprobe": _non_negative,
    "search.coarse_threshold": lambda v: None if -1.0 <= v <= 1.0 else "must be in [-1, 1]",
    "search.match_threshold": lambda v: None if -1.0 <= v <= 1.0 else "must be in [-1, 1]",
    "search.query_chunk": _positive,
    "search.vector_cache_mb": _non_negative,
    "search.rerank": _choice("auto", "chunk", "gallery"),
    "search.shard_cache": _positive,
    "search.threads": _non_negative,
    "search.progress_seconds": _positive,
    "evaluate.recall_at": lambda v: None if v and all(isinstance(k, int) and not isinstance(k, bool)
                                                      and k > 0 for k in v) else "must be a list of ints > 0",
    "evaluate.precision_at_recall": lambda v: None if all(isinstance(r, (int, float)) and 0 < r <= 1
                                                          for r in v) else "must be a list in (0, 1]",
    "evaluate.recall_at_precision": lambda v: None if all(isinstance(r, (int, float)) and 0 < r <= 1
                                                          for r in v) else "must be a list in (0, 1]",
    "evaluate.exact_k": _positive,
    "evaluate.exact_batch_rows": _positive,
    "evaluate.exact_query_chunk": _positive,
    "report.threshold": lambda v: (None if v.get("precision", 0.9) in (0.9, 0.95) and v.get("from_evaluation")
                                   else "from_evaluation needs a metrics.json URL and precision 0.9 or 0.95")
    if isinstance(v, Mapping) else None if -1.0 <= v <= 1.0 else "must be in [-1, 1]",
    "search.normalize.k": _positive,
    "search.normalize.beta": _non_negative,
    "search.normalize.sample": _positive,
    "search.normalize.seed": _non_negative,
    "fit.sample": _positive,
    "fit.seed": _non_negative,
    "fit.shrinkage": lambda v: None if v == "auto" or 0.0 <= v <= 1.0 else "must be 'auto' or in [0, 1]",
    "fit.power": lambda v: None if 0.0 <= v <= 1.0 else "must be in [0, 1]",
    "fit.adapter2_steps": _non_negative,
    "fit.adapter2_lr": _positive,
    "fit.batch_size": _positive,
    "fit.threads": _non_negative,
    "fit.progress_seconds": _positive,
    "report.bands": _ascending_scores,
    "report.norm_bands": _ascending_scores,
    "report.top_queries": _non_negative,
    "report.matches_per_query": _positive,
    "report.thumbnails": _choice("embed", "files", "none"),
    "report.thumbnail_size": lambda v: None if 16 <= v <= 1024 else "must be in [16, 1024]",
    "report.thumbnail_threads": _positive,
    "report.histogram_bins": lambda v: None if 1 <= v <= 1000 else "must be in [1, 1000]",
    "report.histogram_min": lambda v: None if -1.0 <= v < 1.0 else "must be in [-1, 1)",
    "report.batch_rows": _positive,
    "report.errors_shown": _non_negative,
    "report.progress_seconds": _positive,
    "train.stages": lambda v: None if v and all(s in (1, 2, 3) for s in v) and list(v) == sorted(set(v))
    else "must be a non-empty ascending list drawn from 1, 2, 3",
    "train.batch_size": lambda v: None if v >= 2 else "must be >= 2 (the other images are the negatives)",
    "train.temperature": _positive,
    "train.augment_strength": lambda v: None if 0.0 <= v <= 1.0 else "must be in [0, 1]",
    "train.augmentations": _augmentations,
    "train.koleo": _non_negative,
    "train.teacher_weight": _non_negative,
    "train.teacher_temperature": _positive,
    "train.teacher_size": lambda v: None if 32 <= v <= 1024 else "must be in [32, 1024]",
    "train.max_side": lambda v: None if v >= 32 else "must be >= 32",
    "train.backbone_blocks": _non_negative,
    "train.cache_views": _non_negative,
    "train.weight_decay": _non_negative,
    "train.stage1.steps": _non_negative,
    "train.stage2.steps": _non_negative,
    "train.stage3.steps": _non_negative,
    "train.stage1.lr": _positive,
    "train.stage2.lr": _positive,
    "train.stage3.lr": _positive,
    "train.stage3.init": _choice("adapter1", "keep"),
    "train.checkpoint_every": _positive,
    "train.keep_checkpoints": _positive,
    "train.processes": _positive,
    "train.threads": _non_negative,
    "train.progress_seconds": _positive,
    "train.eval_copies": _positive,
    "train.eval_shortlist": _positive,
}


@functools.lru_cache(maxsize=1)
def _defaults_text() -> str:
    return resources.files("retrieval.conf").joinpath("defaults.yaml").read_text()


def defaults() -> dict:
    """The embedded defaults, as a fresh nested dict."""
    return yaml.safe_load(_defaults_text())


class Config(Mapping[str, Any]):
    """Read-only nested configuration with dotted access: ``cfg["extract.batch_size"]``
    or ``cfg.extract.batch_size``."""

    def __init__(self, data: dict, _prefix: str = "") -> None:
        self._data = data
        self._prefix = _prefix

    def __getitem__(self, key: str) -> Any:
        node: Any = self._data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"no config key {self._prefix + key!r}")
            node = node[part]
        full = self._prefix + key
        if isinstance(node, dict) and full not in FREE_MAPPINGS and full not in NUMBER_OR_MAPPING:
            return Config(node, self._prefix + key + ".")
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

    def to_json(self) -> str:
        return json.dumps(self._data, sort_keys=True)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Config":
        data = self.to_dict()
        for key, value in overrides.items():
            _set(data, key, value, source="override")
        validate(data)
        return Config(data)


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


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    if value is None:
        if default is None or key in NULLABLE:
            return None
        raise ConfigError(f"{source}: config key {key!r} must not be null")
    want: type = NULLABLE.get(key, type(default)) if default is None else type(default)
    if key in NUMBER_OR_AUTO:
        if value == "auto":
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: config key {key!r} must be a number or 'auto', got {value!r}")
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


def _set(data: dict, key: str, value: Any, source: str) -> None:
    base = defaults()
    try:
        default = _default_of(key, base)
    except (KeyError, TypeError):
        raise ConfigError(f"{source}: unknown config key {key!r}") from None
    if isinstance(default, dict) and key not in FREE_MAPPINGS:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: config key {key!r} is a section, got {value!r}")
        for sub, v in value.items():
            _set(data, f"{key}.{sub}", v, source)
        return
    value = _coerce(key, value, default, source)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if key in FREE_MAPPINGS:
        node.setdefault(parts[-1], {}).update(value)
    else:
        node[parts[-1]] = value


def validate(data: Mapping) -> None:
    for key, value in _flatten(data):
        check = CHECKS.get(key)
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
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then each overlay file (any fsspec URL) in order, then ``--set`` items, then
    ``overrides`` (already-typed values from CLI flags)."""
    data = defaults()
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
            _set(data, str(key), value, source=url)
    for item in sets:
        key, value = parse_set(item)
        _set(data, key, value, source=f"--set {item}")
    for key, value in (overrides or {}).items():
        _set(data, key, value, source=f"--{key.split('.')[-1]}")
    validate(data)
    return Config(data)
