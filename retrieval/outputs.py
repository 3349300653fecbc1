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

Indexes built before the marker had one name called it ``manifest.json``: :func:`read` still
accepts that name (with a deprecation warning) until 0.3, and the next build or append of that
index writes ``_manifest.json`` and removes the old file.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from retrieval import fsio

log = logging.getLogger(__name__)

MARKER = "_manifest.json"
LEGACY_MARKERS = {"index": "manifest.json"}      # stage -> the marker name it had before 0.2

# what each stage's output is called in error messages, and the command that makes one
WHAT = {"extract": ("feature output", "retrieval extract"), "index": ("index", "retrieval index"),
        "search": ("search output", "retrieval search"), "evaluate": ("evaluation", "retrieval evaluate"),
        "report": ("report", "retrieval report")}


_WARNED: set[str] = set()     # old-name markers already warned about in this process


class OutputError(ValueError):
    """A marker that is not valid JSON or not a JSON object."""


class WrongStageError(OutputError):
    """A marker of another stage than the one expected."""


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
    if cfg is not None:
        out.setdefault("config", cfg.to_dict())
    out.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
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
