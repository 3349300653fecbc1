"""Checking files against the sha256 recorded in the manifest that lists them.

Every stage reads its inputs through a manifest written by the stage before (docs/reliability.md):
a file that is missing, truncated or altered since is refused with :class:`IntegrityError`,
naming the file, before any result is written. :func:`verify_files` checks a list of files,
hashing them in parallel on the engine: Spark tasks (one per file; only ``(url, digest)`` pairs
travel back, and the comparison happens on the driver, so the error is a clear driver-side
exception, not a task failure buried in a Java stack trace), or threads locally.

**Verified once** (``io.verified_record``, docs/reliability.md "Verified once"): a file that matched
its manifest's sha256 is recorded (a JSON file on the driver) with its size and modification stamp
(``mtime``; ETag / generation where the store has them); a later run that finds the same url, the
same expected sha256 and the same size and stamp skips re-hashing it. A write to the file changes
its stamp, so an altered, truncated or replaced file is hashed again and refused. Like git's index,
a file modified within :data:`RACY_SECONDS` of its check is not recorded (a later write in the same
clock tick could keep its stamp). What the record does not catch: a deliberate edit that restores
size and mtime afterwards (``touch -d``); ``io.verified_record: none`` hashes every file every run.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from retrieval import fsio
from retrieval.engine import LOCAL, as_engine, task_error

log = logging.getLogger(__name__)

RACY_SECONDS = 2.0          # a file modified this recently when checked is not recorded
RECORD_ENTRIES = 200_000    # the record keeps the most recent entries
STAMP_KEYS = ("mtime", "LastModified", "last_modified", "ETag", "etag", "updated", "generation",
              "md5Hash", "crc32c")


@task_error
class IntegrityError(ValueError):
    """A file does not match the sha256 its manifest records (or is missing)."""


def record_path(configured: str | None) -> str | None:
    """The verified-once record's path for ``io.verified_record``: ``auto`` is
    ``$RETRIEVAL_CACHE_DIR`` (else ``$XDG_CACHE_HOME/retrieval``, else ``~/.cache/retrieval``)
    ``/verified.json``; ``none`` (or empty) means no record: every file hashed every run."""
    if configured is None or str(configured).lower() in ("", "none", "null", "false"):
        return None
    if str(configured) != "auto":
        return os.path.expanduser(str(configured))
    return os.path.join(fsio.cache_root(), "verified.json")


def _stamp(storage_options: dict | None, url: str) -> dict | None:
    """``{"size", "stamp", "age"}`` of ``url`` (None: missing, or the store gives no modification stamp)."""
    fsio.configure(storage_options)
    try:
        fs, path = fsio.url_to_fs(url)
        info = fs.info(path)
    except (FileNotFoundError, OSError):
        return None
    stamp = {k: str(info[k]) for k in STAMP_KEYS if info.get(k) is not None}
    if not stamp or info.get("size") is None:
        return None
    mtime = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated") if info.get(k)), None)
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    age = time.time() - float(mtime) if isinstance(mtime, (int, float)) else None
    return {"size": int(info["size"]), "stamp": stamp, "age": age}


def _load_record(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}           # missing or unreadable: everything is hashed (and the record rewritten)


def _save_record(path: str, entries: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        data = {**_load_record(path), **entries}          # another run's entries kept
        if len(data) > RECORD_ENTRIES:
            data = dict(sorted(data.items(), key=lambda kv: kv[1].get("checked", 0))[-RECORD_ENTRIES:])
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except OSError as exc:            # a read-only home: verification still happened, nothing lost
        log.warning("could not write the verified-once record %s: %s", path, exc)


def _digest(storage_options: dict | None, url: str) -> tuple[str, str | None]:
    fsio.configure(storage_options)
    try:
        return url, fsio.sha256_file(url)
    except FileNotFoundError:
        return url, None


def verify_files(files: Sequence[tuple[str, str | None]], what: str, manifest: str, engine: Any = None,
                 storage_options: dict | None = None, threads: int = 4, record: str | None = None) -> int:
    """Check each ``(url, sha256)`` (entries without a sha256 are skipped); raise
    :class:`IntegrityError` naming the first bad file and ``manifest`` (the manifest that records
    it). ``record``: the verified-once record's path (:func:`record_path`): files it lists with
    the same sha256, size and stamp are not hashed again. Returns the number of files hashed."""
    wanted = {url: sha for url, sha in files if sha}
    if not wanted:
        return 0
    urls = sorted(wanted)
    stamps: dict[str, dict | None] = {}
    if record:
        with ThreadPoolExecutor(min(16, len(urls))) as pool:       # object stores: one request each
            stamps = dict(zip(urls, pool.map(functools.partial(_stamp, storage_options), urls)))
        known = _load_record(record)
        urls = [u for u in urls if not _same(known.get(u), wanted[u], stamps[u])]
    hash_one = functools.partial(_digest, storage_options)
    eng = as_engine(engine) if len(urls) > 1 else LOCAL      # one file: no Spark job for it
    got = dict(eng.map(hash_one, urls, f"verify {what}", threads=threads)) if urls else {}
    for url in urls:
        if got.get(url) is None:
            raise IntegrityError(f"{what} {url} (listed in {manifest}) is missing")
        if got[url] != wanted[url]:
            raise IntegrityError(f"{what} {url} does not match the sha256 recorded in {manifest} "
                                 "(truncated or altered since it was written)")
    if record and urls:
        now = time.time()
        fresh = {u: {"sha256": wanted[u], "size": stamps[u]["size"], "stamp": stamps[u]["stamp"], "checked": now}
                 for u in urls if stamps.get(u) is not None and _settled(stamps[u])}
        if fresh:
            _save_record(record, fresh)
    log.info("%s: %d of %d hashed and matching %s, %d unchanged since their last check", what, len(urls),
             len(wanted), manifest, len(wanted) - len(urls))
    return len(urls)


def _settled(now: dict) -> bool:
    """Safe to record: last modified over :data:`RACY_SECONDS` ago, or (no usable time) stamped by content."""
    if now["age"] is not None:
        return now["age"] > RACY_SECONDS
    return any(k in now["stamp"] for k in ("ETag", "etag", "generation", "md5Hash", "crc32c"))


def _same(entry: dict | None, sha256: str, now: dict | None) -> bool:
    """The record's entry is for this sha256 and the file still has the recorded size and stamp."""
    return (entry is not None and now is not None and entry.get("sha256") == sha256
            and entry.get("size") == now["size"] and entry.get("stamp") == now["stamp"])
