"""The stage-output contract, one for every stage: an output directory is complete when its marker
``_manifest.json`` exists, and the marker is the only way a later stage reads it.

- :func:`begin`: remove the marker before anything is written (a killed run leaves no marker, so
  nothing downstream takes a partial output for a complete one). The index is the exception: an
  append keeps the old marker until the new one replaces it, because the old index stays
  complete and servable while new shards are added beside it.
- :func:`commit`: the stage's manifest (its own counts, parameters, timings and the sha256 of every
  file it wrote, under keys of its own) plus the common tail (``stage``, ``config``, ``engine``,
  ``created``), written LAST.
- :func:`read` / :func:`find`: the marker of a complete output of the expected stage, or a clear
  error (:func:`read`) / None (:func:`find`).

Before anything is written, :func:`claim` checks what the output already holds and takes its lease:

- **identity** (``_identity.json``, written at the claim and kept): the stage, the role, the input
  URL(s) and a hash of the settings that change the output (:data:`SETTINGS`). Writing into an
  output of the same identity resumes it; anything else (another stage, role, input or settings, or
  a non-empty folder or a file that is no stage output) is refused with one line naming what is
  there and ``--overwrite``, before any write. ``append`` (``index --append``) only needs the same
  stage and settings: it adds inputs.
- **lease** (``_lease.json``: owner, host, pid, started, expires), created exclusively (local: an
  atomic link; S3: a conditional PUT ``If-None-Match: *``), renewed by a heartbeat thread and
  removed when the stage function returns or raises (:func:`leased`); a second writer while it is
  live is refused (:class:`LeaseHeldError`), an expired one (a killed run) is taken over.

A file output (``fit``'s checkpoint, ``export``'s ONNX file) keeps both beside it:
``<file>.identity.json`` and ``<file>.lease.json``.

Indexes built before the marker had one name called it ``manifest.json``: :func:`read` still
accepts that name (with a deprecation warning) until 0.3, and the next build or append of that
index writes ``_manifest.json`` and removes the old file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Sequence

from retrieval import fsio
from retrieval.lease import LEASE_SECONDS, Lease, LeaseHeldError, held, leased  # noqa: F401  (the stage API)

log = logging.getLogger(__name__)

MARKER = "_manifest.json"
LEGACY_MARKERS = {"index": "manifest.json"}      # stage -> the marker name it had before 0.2

# what each stage's output is called in error messages, and the command that makes one
WHAT = {"extract": ("feature output", "retrieval extract"), "index": ("index", "retrieval index"),
        "search": ("search output", "retrieval search"), "evaluate": ("evaluation", "retrieval evaluate"),
        "report": ("report", "retrieval report"), "pdq": ("PDQ match output", "retrieval pdq match"),
        "duplicates": ("duplicates output", "retrieval duplicates")}


_WARNED: set[str] = set()     # old-name markers already warned about in this process


class OutputError(ValueError):
    """A marker that is not valid JSON or not a JSON object."""


class WrongStageError(OutputError):
    """A marker of another stage than the one expected."""


class OutputExistsError(ValueError):
    """The output holds something this run must not replace without ``--overwrite``."""


def marker_url(output_url: str) -> str:
    return fsio.join(output_url, MARKER)


def marker_of(output_url: str, stage: str) -> str | None:
    """The marker present in ``output_url``: ``_manifest.json``, else the stage's pre-0.2 name, else None."""
    for name in (MARKER, LEGACY_MARKERS.get(stage)):
        if name and fsio.exists(fsio.join(output_url, name)):
            return fsio.join(output_url, name)
    return None


def configure_and_check_writable(output_url: str, storage_options: dict | None) -> None:
    """Before a stage reads anything: the filesystems configured (``io.storage_options``) and the
    output checked writable, so a bad URL fails before any work."""
    fsio.configure(storage_options)
    fsio.ensure_writable(output_url)


def _remove(url: str) -> None:
    if fsio.exists(url):
        fs, path = fsio.url_to_fs(url)
        fs.rm(path)


def begin(output_url: str) -> None:
    """The output is being (re)written: remove its marker first."""
    _remove(marker_url(output_url))


def commit(output_url: str, stage: str, manifest: dict[str, Any], engine: Any = None, cfg: Any = None) -> dict:
    """Write the marker, last; returns the manifest with the common tail (``stage``, ``engine``'s name,
    ``config``, ``created``) filled in where the stage did not set it."""
    out = {"stage": stage, **manifest}
    if engine is not None:
        out.setdefault("engine", getattr(engine, "name", engine))
        if getattr(engine, "session", None) is not None:
            out.setdefault("engine_session", engine.session)
    if cfg is not None:
        out.setdefault("config", cfg.to_dict())
    out.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for lease in held():            # an append's grown identity: once the appended index is complete
        if lease.output == output_url and lease.pending_identity is not None:
            fsio.write_json(fsio.join(output_url, IDENTITY), lease.pending_identity)
            lease.pending_identity = None
    fsio.write_json(marker_url(output_url), out)
    if stage in LEGACY_MARKERS:
        _remove(fsio.join(output_url, LEGACY_MARKERS[stage]))
    return out


def read(output_url: str, stage: str, hint: str = "") -> dict[str, Any]:
    """The manifest of a COMPLETE ``stage`` output: FileNotFoundError when there is no marker (the
    stage did not finish, or this is not its output), :class:`OutputError` when it is not a JSON
    object, :class:`WrongStageError` when it is another stage's."""
    url = marker_of(output_url, stage)
    what, command = WHAT.get(stage, (f"{stage} output", f"retrieval {stage}"))
    if url is None:
        raise FileNotFoundError(f"{output_url} has no {MARKER}: not a (complete) {what} "
                                f"of '{command}'{hint}")
    if not url.endswith(MARKER) and url not in _WARNED:
        _WARNED.add(url)
        log.warning("%s: the marker's pre-0.2 name; the next '%s' of this output renames it %s",
                    url, command, MARKER)
    try:
        m = fsio.read_json(url)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OutputError(f"{url} is not valid JSON: {exc}") from None
    if not isinstance(m, dict):
        raise OutputError(f"{url}: expected a JSON object, got {type(m).__name__}")
    if m.get("stage") != stage:
        raise WrongStageError(f"{url}: stage is {m.get('stage')!r}, expected {stage!r}{hint}")
    return m


def find(output_url: str, stage: str) -> dict[str, Any] | None:
    """The manifest when ``output_url`` is a complete ``stage`` output, else None (no marker, or one
    of another stage); a marker that is not a JSON object is still an error."""
    try:
        return read(output_url, stage)
    except (FileNotFoundError, NotADirectoryError, WrongStageError):
        return None


def file_entries(output_url: str, names: list[str]) -> list[dict[str, Any]]:
    """``{"file", "bytes", "sha256"}`` of each file ``output_url/<name>`` the stage wrote, for its marker."""
    out = []
    for name in names:
        url = fsio.join(output_url, name)
        fs, path = fsio.url_to_fs(url)
        out.append({"file": name, "bytes": int(fs.size(path)), "sha256": fsio.sha256_file(url)})
    return out


# ---------------------------------------------------------------------------------------------
# identity: what an output is, so that nothing replaces it silently
IDENTITY, LEASE = "_identity.json", "_lease.json"
# per stage: the config sections whose values change the output, less the keys that only change how
# fast or where it is computed (any key named in RUNTIME, in any section, and the stage's own list)
RUNTIME = {"mode", "threads", "progress_seconds", "verify", "device", "batch_rows", "resume", "processes",
           "local_mode", "onnx_cache", "decode_threads", "decoder"}
# keys that only change how the output is computed but were hashed before that was known: hashed at the
# value they had then, so that outputs written then keep their identity (model.runtime: auto gives
# torch's rows under the same model_version); and keys hashed only away from their default
HASHED_AS = {"model.runtime": "torch", "model.onnx_file": None}
OMITTED_AT = {"model.precision": "fp32", "extract.pdq": False, "extract.query_regions": []}
# keys that do not change a role's rows: left out of its identity (a gallery has no query regions)
ROLE_ONLY = {("extract", "gallery"): ("extract.query_regions",)}
SETTINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "extract": (("model", "preprocess", "extract"), ("extract.role", "extract.num_shards",
                                                     "extract.row_group_size", "extract.batch_size")),
    "index": (("index",), ("index.dedup_on_driver_max", "index.fine_by_list")),
    "search": (("model", "preprocess", "search"), ("search.query_chunk", "search.vector_cache_mb",
                                                   "search.rerank", "search.shard_cache", "search.fine_layout")),
    "fit": (("model", "preprocess", "fit"), ("fit.batch_size",)),
    "duplicates": (("model", "preprocess", "search", "duplicates"),
                   ("search.query_chunk", "search.vector_cache_mb", "search.rerank", "search.shard_cache",
                    "search.fine_layout", "search.k", "search.collapse_groups", "duplicates.largest")),
    "evaluate": (("evaluate",), ("evaluate.exact_batch_rows", "evaluate.exact_query_chunk")),
    "report": (("report",), ("report.thumbnail_threads",)),
    "train": (("model", "preprocess", "train"), ("train.checkpoint_every", "train.keep_checkpoints")),
    "export": (("model", "preprocess"), ("model.runtime", "model.onnx_file")),
    "pdq": (("pdq",), ("pdq.chunk_rows", "pdq.shard_rows")),
    # retrieval run: its inputs only (a changed setting reruns the stages it changes, inside the run)
    "run": ((), ()),
}


def _flat(d: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


def settings_hash(stage: str, cfg: Any, also_skip: tuple[str, ...] = ()) -> str:
    """sha256 (16 hex) of the settings of ``cfg`` that change ``stage``'s output (:data:`SETTINGS`;
    ``also_skip``: keys that do not apply to this run, e.g. a gallery's query regions)."""
    sections, skip = SETTINGS.get(stage, ((), ()))
    skip = (*skip, *also_skip)
    values = {}
    for section in sections:
        node = cfg[section]
        for key, v in _flat(node.to_dict() if hasattr(node, "to_dict") else node, section).items():
            if key not in skip and key.rsplit(".", 1)[-1] not in RUNTIME \
                    and not (key in OMITTED_AT and v == OMITTED_AT[key]):
                values[key] = HASHED_AS.get(key, v) if key in HASHED_AS else v
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity(stage: str, cfg: Any, inputs: Sequence[str | None], role: str | None = None) -> dict:
    """What a run of ``stage`` writes: compared with the identity an output already holds."""
    return {"stage": stage, "role": role, "inputs": [str(u).rstrip("/") for u in inputs if u],
            "settings": settings_hash(stage, cfg, ROLE_ONLY.get((stage, role), ())),
            "settings_of": list(SETTINGS[stage][0])}


def _side(output_url: str, name: str, file: bool) -> str:
    return output_url + "." + name.lstrip("_") if file else fsio.join(output_url, name)


def _stored(output_url: str, file: bool) -> dict | None:
    """The identity the output holds: its ``_identity.json``; else, for an output written before
    identities, ``{"stage", "role", "legacy"}`` from its marker (a fit's card); else None."""
    url = _side(output_url, IDENTITY, file)
    if fsio.exists(url):
        return fsio.read_json(url)
    marker = output_url + ".card.json" if file else marker_of(output_url, "index")
    if marker and fsio.exists(marker):
        m = fsio.read_json(marker)
        if isinstance(m, dict) and m.get("stage"):
            return {"stage": m["stage"], "role": m.get("role"), "legacy": True}
    return None


def _holds_anything(output_url: str, file: bool, ignore: tuple[str, ...] = ()) -> bool:
    fs, path = fsio.url_to_fs(output_url)
    if file or not fs.exists(path):
        return fs.exists(path) and not fs.isdir(path)
    fs.invalidate_cache(path)
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return any(n not in (LEASE, *ignore) and not n.startswith(".write-probe-") for n in names)


def _difference(stored: dict, ident: dict, append: bool) -> str:
    if stored.get("stage") != ident["stage"]:
        return ""
    if stored.get("role") != ident["role"] and (stored.get("role") or not stored.get("legacy")):
        return f"role {stored.get('role')!r}, this run's is {ident['role']!r}"
    if stored.get("legacy"):
        return "same"
    if not append and stored.get("inputs") != ident["inputs"]:
        return f"input {', '.join(stored.get('inputs') or ['(none)'])}, this run's is {', '.join(ident['inputs'])}"
    if stored.get("settings") != ident["settings"]:
        return f"other settings ({'/'.join(stored.get('settings_of') or ident['settings_of'])})"
    return "same"


def stored_stage(stored: dict | None) -> str | None:
    return (stored or {}).get("stage")


def _a(stage: Any) -> str:
    return f"{'an' if str(stage)[:1] in 'aeiou' else 'a'} {stage}"


def check(output_url: str, ident: dict, overwrite: bool = False, append: bool = False,
          file: bool = False) -> dict | None:
    """Read only: None when ``output_url`` is empty or holds an output of this identity (resume);
    else :class:`OutputExistsError` naming what is there, or, with ``overwrite``, a warning."""
    stored = _stored(output_url, file)
    if stored is None:
        if not _holds_anything(output_url, file):
            return None
        what = "a file" if file else "a non-empty folder"
        what = f"{what} that is not the output of any retrieval stage"
    else:
        diff = _difference(stored, ident, append)
        if diff == "same":
            return stored
        what = (f"{_a(stored.get('stage'))} output" + (f" ({diff})" if diff else "")
                + ("" if diff else f", not {_a(ident['stage'])} output"))
    if overwrite:
        log.warning("%s holds %s: replaced (--overwrite)", output_url, what)
        return None
    extend = ", --append to add to it" if ident["stage"] == stored_stage(stored) == "index" else ""
    raise OutputExistsError(f"{output_url} holds {what}; nothing was written: pass --overwrite to "
                            f"replace it{extend}, or choose another --output")


def claim(output_url: str, ident: dict, cfg: Any = None, overwrite: bool = False, append: bool = False,
          file: bool = False) -> "Lease":
    """:func:`check`, then the lease (:class:`Lease`), then the identity written: call it before
    the stage writes anything, inside a function decorated with :func:`leased`."""
    stored = check(output_url, ident, overwrite, append, file)
    seconds = float(cfg["io.lease_seconds"]) if cfg is not None else LEASE_SECONDS
    lease = Lease(_side(output_url, LEASE, file), output_url, ident["stage"], seconds).acquire()
    held().append(lease)
    if append and stored is not None:     # the inputs grow when the append commits, not before
        old = [] if stored.get("legacy") else stored.get("inputs", [])
        lease.pending_identity = {**ident, "inputs": list(dict.fromkeys([*old, *ident["inputs"]]))}
    elif stored != ident:
        fsio.write_json(_side(output_url, IDENTITY, file), ident)
    if stored is None and not file and not _holds_anything(output_url, file, ignore=(IDENTITY,)):
        lease.on_failure = lambda: _unclaim(output_url)
    return lease


def _unclaim(output_url: str) -> None:
    """A run that failed before writing anything into a fresh output leaves no identity behind."""
    if not _holds_anything(output_url, False, ignore=(IDENTITY,)):
        _remove(fsio.join(output_url, IDENTITY))


def claim_existing(output_url: str, stage: str, writer: str, cfg: Any = None) -> "Lease":
    """The lease on a COMPLETE ``stage`` output that ``writer`` changes in place by design
    (``retrieval remove`` and ``index --compact`` on an index): not an overwrite, so no identity
    is replaced; refused (:class:`OutputExistsError`) when the output holds another stage's output,
    (:class:`LeaseHeldError`) while another run writes it. Call it inside a :func:`leased` function."""
    stored = _stored(output_url, False)
    if stored_stage(stored) not in (None, stage):
        raise OutputExistsError(f"{output_url} holds {_a(stored_stage(stored))} output, not {_a(stage)} "
                                f"output: '{writer}' changes only {_a(stage)} output")
    read(output_url, stage)       # complete: FileNotFoundError names what is missing
    seconds = float(cfg["io.lease_seconds"]) if cfg is not None else LEASE_SECONDS
    lease = Lease(_side(output_url, LEASE, False), output_url, writer, seconds).acquire()
    held().append(lease)
    return lease
