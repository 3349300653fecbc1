"""Checking files against the sha256 recorded in the manifest that lists them.

Every stage reads its inputs through a manifest written by the stage before (docs/reliability.md):
a file that is missing, truncated or altered since is refused with :class:`IntegrityError`,
naming the file, before any result is written. :func:`verify_files` checks a list of files,
hashing them in parallel on the engine: Spark tasks (one per file; only ``(url, digest)`` pairs
travel back, and the comparison happens on the driver, so the error is a clear driver-side
exception, not a task failure buried in a Java stack trace), or threads locally.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

from retrieval import fsio
from retrieval.engine import LOCAL, as_engine, task_error

log = logging.getLogger(__name__)


@task_error
class IntegrityError(ValueError):
    """A file does not match the sha256 its manifest records (or is missing)."""


def _digest(storage_options: dict | None, url: str) -> tuple[str, str | None]:
    fsio.configure(storage_options)
    try:
        return url, fsio.sha256_file(url)
    except FileNotFoundError:
        return url, None


def verify_files(files: Sequence[tuple[str, str | None]], what: str, manifest: str, engine: Any = None,
                 storage_options: dict | None = None, threads: int = 4) -> int:
    """Check each ``(url, sha256)`` (entries without a sha256 are skipped); raise
    :class:`IntegrityError` naming the first bad file and ``manifest`` (the manifest that records
    it). Returns the number of files checked."""
    wanted = {url: sha for url, sha in files if sha}
    if not wanted:
        return 0
    hash_one = functools.partial(_digest, storage_options)
    urls = sorted(wanted)
    eng = as_engine(engine) if len(urls) > 1 else LOCAL      # one file: no Spark job for it
    got = dict(eng.map(hash_one, urls, f"verify {what}", threads=threads))
    for url in urls:
        if got.get(url) is None:
            raise IntegrityError(f"{what} {url} (listed in {manifest}) is missing")
        if got[url] != wanted[url]:
            raise IntegrityError(f"{what} {url} does not match the sha256 recorded in {manifest} "
                                 "(truncated or altered since it was written)")
    log.info("verified %d %s files against %s", len(urls), what, manifest)
    return len(urls)
